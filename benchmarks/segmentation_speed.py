"""Issue 18's speed and memory targets: GAPA's test pass against the U-Net's own forward.

At batch 32 of 64x64 scenes, in one process, plain and GAPA interleaved, best of
``--repeats``: ``gm(x)`` (the logit moments) and ``gm.classify(x, class_dim=1)`` (the
calibrated per-pixel predictive, every score) over the plain forward, for the segmentation
benchmark's U-Net of seed 0 with GAPA as the benchmark fits it (layer ``dec1.5``, exact faiss
search) and with the library's defaults, and for the same architecture at 4x and 8x the widths
(random weights: a probe of how the ratio falls as the network's work per pixel grows; the cost
does not depend on the weights); each with the neighbour search's own share of the pass (a
floor). Then the peak resident memory of a 96x96 batch of 32 (11 classes) above the resident
memory before it, for the forward and for classify, each in a fresh process (in a warm one,
memory freed earlier is reused and hides the peak).

Usage: python benchmarks/segmentation_speed.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import best_of, header
from gapa import GAPA
from gapa.io import atomic_path
from gapa_bench.architectures import UNet
from gapa_bench.data.scenes import load_scenes
from gapa_bench.memory import peak_rss_mib, reset_peak_rss, rss_mib
from gapa_bench.provenance import run_info
from gapa_bench.segmentation_bench import BATCH, GAPA_FIXED
from gapa_bench.segmenters import WIDTHS, build_segmenter, cached_segmenter

#: The scenes of the benchmark's defaults (``gapa-bench segmentation``).
SCENES = {"side": 64, "n_train": 3000, "n_val": 300, "n_test": 300, "n_ood": 200}
#: Scenes per forward pass of the fits (the 4x wider U-Net's activations of 1024 scenes, the
#: library's default, would need about 20 GB).
FIT_BATCH = 256
#: Width factors of the random-weight U-Nets (8x: 64 channels at full resolution, the
#: original U-Net's first width).
WIDER = (4, 8)
#: Labels of the scenes: background and the 10 Fashion-MNIST classes.
N_CLASSES = 11


def fitted(model, data, **options) -> GAPA:
    gm = GAPA(model, seed=0, **options).fit(data.train.images, batch_size=FIT_BATCH,
                                            progress=False)
    gm.calibrate_classifier(data.val.images, data.val.labels, class_dim=1, batch_size=BATCH)
    return gm


def timings(model, gm: GAPA, x: torch.Tensor, repeats: int) -> dict:
    with torch.no_grad():
        model(x[:2])
        gm.classify(x[:2], class_dim=1)  # warm-up
        plain = best_of(lambda: model(x), repeats)
        moments = best_of(lambda: gm(x), repeats)
        classify = best_of(lambda: gm.classify(x, class_dim=1, batch_size=None), repeats)
        # the neighbour search and the conditioning alone, at the fastest of the repeats: the
        # search is a floor that no propagation work can lower
        search = conditioning = float("inf")
        (site,) = gm.sites.values()
        for _ in range(repeats):
            site.timings.update(search=0.0, conditioning=0.0)
            gm(x)
            search = min(search, site.timings["search"])
            conditioning = min(conditioning, site.timings["conditioning"])
    return {"plain_s": plain, "moments_s": moments, "classify_s": classify,
            "moments_ratio": moments / plain, "classify_ratio": classify / plain,
            "search_s": search, "conditioning_s": conditioning, "search_ratio": search / plain}


def measure_memory(what: str, weights: str, state: str, inputs: str) -> None:
    """In a fresh process (``--memory``): print the MiB of resident memory that one forward or
    one ``classify`` of the saved batch needs above what the process held before it."""
    model = build_segmenter(N_CLASSES)
    model.load_state_dict(load_file(weights))
    model.eval()
    x = torch.load(inputs)
    gm = GAPA.load(state, model)
    run = {"forward": lambda: model(x),
           "classify": lambda: gm.classify(x, class_dim=1, batch_size=None)}[what]
    before = rss_mib()
    reset_peak_rss()
    with torch.no_grad():
        run()
    print(peak_rss_mib() - before)


def memory_above(what: str, *paths: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory", what, *paths], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--memory", nargs=4, help=argparse.SUPPRESS)  # the fresh process's job
    args = p.parse_args()
    if args.memory:
        return measure_memory(*args.memory)
    run = run_info(sys.argv)
    print(header(f"U-Net on {SCENES['side']}x{SCENES['side']} scenes, batch {BATCH}"))
    data = load_scenes(seed=0, **SCENES)
    model, weights, _ = cached_segmenter(data, seed=0, progress=False)
    wide = {}
    for factor in WIDER:
        torch.manual_seed(0)
        wide[factor] = UNet(num_classes=data.n_classes,
                            widths=tuple(factor * w for w in WIDTHS)).eval()
    x = data.test.images[:BATCH].clone()
    rows, gms = [], []
    for name, net, widths, options in [
            ("benchmark U-Net, gapa (dec1.5, faiss)", model, WIDTHS,
             {"layers": ["dec1.5"], **GAPA_FIXED}),
            ("benchmark U-Net, gapa_default", model, WIDTHS, {}),
            *((f"{f}x wider U-Net (random weights), gapa (dec1.5, faiss)", wide[f],
               tuple(f * w for w in WIDTHS), {"layers": ["dec1.5"], **GAPA_FIXED})
              for f in WIDER)]:
        gm = fitted(net, data, **options)
        gms.append(gm)
        row = {"setting": name, "widths": list(widths),
               "layers": gm.layers, "m": gm.config.m, "k": gm.config.k,
               "search": gm.config.search.value, **timings(net, gm, x, args.repeats)}
        rows.append(row)
        print(f"{name}: plain {row['plain_s']:.3f} s, gm(x) x{row['moments_ratio']:.2f}, "
              f"classify x{row['classify_ratio']:.2f}", flush=True)
    big = load_scenes(seed=0, side=96, n_train=8, n_val=8, n_test=BATCH, n_ood=1).test.images
    with tempfile.TemporaryDirectory() as tmp:
        paths = (str(weights), gms[0].save(Path(tmp) / "gapa"), Path(tmp) / "x.pt")
        torch.save(big, paths[2])
        paths = tuple(map(str, paths))
        memory = {"shape": list(big.shape), "classes": data.n_classes,
                  "logits_mib": big.numel() * data.n_classes * big.element_size() / 2**20,
                  "forward_mib": memory_above("forward", *paths),
                  "classify_mib": memory_above("classify", *paths)}
    print(f"96x96 batch of {BATCH}: forward +{memory['forward_mib']:.0f} MiB, classify "
          f"+{memory['classify_mib']:.0f} MiB (the logits alone: {memory['logits_mib']:.0f} MiB)")
    if args.json_path:
        record = {"kind": "segmentation_speed", "batch": BATCH, "side": SCENES["side"],
                  "rows": rows, "memory": memory, "threads": torch.get_num_threads(), "run": run}
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
