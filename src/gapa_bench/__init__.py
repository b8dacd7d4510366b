"""gapa_bench: the benchmark harness of gapa (data, trained networks, peers, drivers, demo).

It imports :mod:`gapa`; the library never imports it. Install with ``pip install gapa[bench]``.
"""
