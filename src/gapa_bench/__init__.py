"""gapa_bench."""
