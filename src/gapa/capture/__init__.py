"""gapa.capture."""
