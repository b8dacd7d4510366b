"""gapa.predictive."""
