"""Regenerate every benchmark table of the Markdown files from the JSON records (issue 16):

    python benchmarks/report.py [--check] [FILES...]

FILES default to benchmarks/RESULTS.md and README.md; paths are relative to the current
directory (run it from the repository root). ``--check`` writes nothing and exits 1 listing
the files whose tables no longer match their records. See :mod:`gapa_bench.report`.
"""

from __future__ import annotations

import sys

from gapa_bench.report import main

if __name__ == "__main__":
    sys.exit(main())
