"""gapa.gp."""
