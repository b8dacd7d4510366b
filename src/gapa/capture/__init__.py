"""Capture: hooks on the GAPA layers, checks of the inputs, and the on-disk activation store."""
