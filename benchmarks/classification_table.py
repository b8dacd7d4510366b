"""The Markdown table of `gapa-bench classification` from one or more of its JSON files, e.g.
runs of different methods merged:

    python benchmarks/classification_table.py benchmarks/results/fmnist-mlp-*.json
"""

from __future__ import annotations

import sys

from gapa_bench.classification_bench import load_records, summary_table

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summary_table(load_records(*sys.argv[1:])))
