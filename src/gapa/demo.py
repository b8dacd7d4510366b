"""``gapa demo``: the main job. Train (or reuse) the published backbone on real flight delays,
fit GAPA on its training activations, calibrate on validation, compare with MAP on test."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import cached_regressor
from .data import RegressionData, load_csv, load_flights
from .io import atomic_path
from .plotting import demo_figure
from .regression import MethodResult, evaluate_gapa, evaluate_map

#: GAPA settings of the demo, chosen from benchmarks/defaults_ablation.py (see RESULTS.md).
DEMO_GAPA = {"layers": ["3"], "k": 1, "m": 512}


@dataclass
class DemoConfig:
    csv: str | None = None
    target: str | None = None
    split: str = "time"
    seed: int = 0
    json_path: str | None = None
    figure: str = "gapa-demo.png"
    progress: bool = True
    gapa: dict = field(default_factory=lambda: dict(DEMO_GAPA))


def load_demo_data(cfg: DemoConfig) -> RegressionData:
    if cfg.csv is not None:
        return load_csv(cfg.csv, cfg.target)
    return load_flights(split=cfg.split, seed=cfg.seed)


def run_demo(cfg: DemoConfig) -> list[MethodResult]:
    data = load_demo_data(cfg)
    print(f"data: {data.describe()}")
    model, path, trained = cached_regressor(data, seed=cfg.seed, progress=cfg.progress)
    print(f"backbone: MLP 3x200 tanh, {'trained and saved to' if trained else 'loaded from'} {path}")
    layers = cfg.gapa.get("layers")
    if layers and any(name not in dict(model.named_modules()) for name in layers):
        cfg.gapa.pop("layers")
    map_res = evaluate_map(model, data)
    gapa_res, gm = evaluate_gapa(model, data, progress=cfg.progress, **cfg.gapa)
    results = [map_res, gapa_res]
    print(f"\nGAPA: layers {gm.layers}, k={gm.config.k}, m={gm.config.m}; calibrated scale "
          f"{gm.calibration.scale:.3g}, noise {gm.calibration.noise:.3g} (standardised units)")
    print(format_table(results, unit="target units" if cfg.csv else "minutes"))
    if cfg.json_path:
        write_json(cfg.json_path, [r.record() for r in results])
        print(f"records written to {cfg.json_path}")
    fig = _figure(cfg, data, gm, map_res, gapa_res)
    print(f"figure saved to {fig}")
    return results


def format_table(results: list[MethodResult], unit: str) -> str:
    base = results[0].test_s
    lines = [
        f"| method | NLL | CRPS ({unit}) | CQM | RMSE ({unit}) | fit s | test s | test / MAP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.nll:.3f} | {r.crps:.3f} | {r.cqm:.3f} | {r.rmse:.3f} | "
            f"{r.fit_s:.2f} | {r.test_s:.3f} | {r.test_s / base:.1f}x |"
        )
    return "\n".join(lines)


def write_json(path: str | os.PathLike, records: list[dict]) -> None:
    """Write aside, then rename: an interrupted run never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(records, f, indent=2)


def _figure(cfg: DemoConfig, data: RegressionData, gm, map_res, gapa_res) -> Path:
    key = next(iter(gm.sites))
    site = gm.sites[key]
    n = min(3000, len(data.x_test))
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(data.x_test), generator=gen)[:n]
    sets = {"test": data.x_test[idx], "shifted test (x 3)": data.x_test[idx] * 3.0}
    distance, variance = {}, {}
    with torch.no_grad():
        for name, x in sets.items():
            z = gm.pre_activations(x)[key]
            distance[name] = site.nearest_distance(z).numpy()
            variance[name] = gm(x).var[:, 0].numpy()
    y = (data.y_test * data.y_std + data.y_mean)[:, 0].numpy()
    return demo_figure(
        Path(cfg.figure),
        distance=distance,
        variance=variance,
        abs_error=np.abs(gapa_res.mean[:, 0].numpy() - y),
        gapa_std=gapa_res.std[:, 0].numpy(),
        map_std=float(map_res.std[0, 0]),
        title=f"GAPA on {data.name} ({data.split}), layer {key}",
    )
