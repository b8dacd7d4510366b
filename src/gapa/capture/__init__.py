"""Capture of the GAPA layers' pre-activations: call-site hooks and the on-disk store."""
