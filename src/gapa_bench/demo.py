"""``gapa-bench demo``: the main job. Train (or reuse) the published backbone on real flight delays,
fit GAPA on its training activations, calibrate on validation, compare with MAP on test."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .backbones import cached_regressor
from .bench import GAPA_DEFAULT, summary_table, write_records
from .data import RegressionData, load_csv, load_flights
from .plotting import demo_figure
from .regression import MethodResult, fit_gapa, fit_map, run_method


@dataclass
class DemoConfig:
    csv: str | None = None
    target: str | None = None
    split: str = "time"
    seed: int = 0
    json_path: str | None = None
    figure: str = "gapa-demo.png"
    progress: bool = True
    gapa: dict = field(default_factory=lambda: dict(GAPA_DEFAULT))


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
    run = partial(run_method, backbone=model, data=data, seed=cfg.seed, progress=cfg.progress)
    map_res = run("map", fit_map)
    gapa_res = run("gapa", partial(fit_gapa, **cfg.gapa))
    gm = gapa_res.fitted.handle
    results = [map_res, gapa_res]
    print(f"\nGAPA: layers {gm.layers}, k={gm.config.k}, m={gm.config.m}; calibrated scale "
          f"{gapa_res.scale:.3g}, noise {gapa_res.noise:.3g} (standardised units); "
          f"CRPS and RMSE in {'target units' if cfg.csv else 'minutes'}")
    print(summary_table(results))
    if cfg.json_path:
        write_records(cfg.json_path, results)
        print(f"records written to {cfg.json_path}")
    fig = _figure(cfg, data, gm, map_res, gapa_res)
    print(f"figure saved to {fig}")
    return results


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
