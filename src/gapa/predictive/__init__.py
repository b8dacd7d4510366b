"""Calibrated predictives: regression (noise and scale) and classification (probit, OOD)."""
