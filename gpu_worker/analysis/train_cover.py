"""Train the fractional-cover MLP (:mod:`gpu_worker.analysis.cover`) on the ``fractionalcover3`` field data.

``python -m gpu_worker.analysis.train_cover [--out gpu_worker/analysis/weights]`` downloads the pinned wheel once into
``.local/fractionalcover3`` (``pip download --no-deps``; MIT licence, the data is not committed), checks the sha256 of
``training_data.json``, holds out 20 % of the field observations, trains on the rest and writes
``fractional_cover.pt`` (state_dict) and ``cover_metrics.json`` (held-out RMSE per fraction, split, seed, checksum).

The data: one row per field site visit, Landsat TM/ETM+ surface reflectance (OLI adjusted to ETM+) averaged over
3x3 pixels in bands b2 (green), b3 (red), b4 (nir), b5 (swir16), b7 (swir22), reflectance 0-1, and measured
cover fractions ``bare``, ``pv`` (green), ``npv`` (non-green) summing to 1 (+-2 %, renormalised here).

The split is by observation: rows with identical measured cover (the same field survey matched to several images)
go to the same side, so the held-out RMSE does not reward memorising a site. Training is seeded and uses
deterministic algorithms: the same seed, data and machine give bit-identical weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_worker.analysis.cover import FRACTIONS, FractionalCover, features

PACKAGE = "fractionalcover3==2.0.0"
DATA_MEMBER = "fractionalcover3/pkgdata/training_data.json"
LICENSE_MEMBER = "fractionalcover3-2.0.0.dist-info/licenses/LICENSE.txt"
DATA_SHA256 = "3a399ac30ae9e8abac1889857a03db64aa974b3e603d2c892104a72c790b2570"
DEFAULT_CACHE = Path(".local/fractionalcover3")
DEFAULT_OUT = Path(__file__).parent / "weights"
BAND_COLUMNS = ("b2", "b3", "b4", "b5", "b7")  # green, red, nir, swir16, swir22 (Landsat TM/ETM+ numbering)
LABEL_COLUMNS = ("bare", "pv", "npv")  # = FRACTIONS order: bare, green, non_green
SURVEY_COLUMNS = ("bare", "pv", "npv", "crypto", "pg", "pnpv")  # identical values = the same field survey


@dataclass(frozen=True)
class Config:
    seed: int = 0
    held_out: float = 0.2
    epochs: int = 150
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-3
    dropout: float = 0.1


@dataclass(frozen=True)
class Dataset:
    reflectance: np.ndarray  # [rows, 5] float32
    cover: np.ndarray  # [rows, 3] float32, rows sum to 1
    survey: np.ndarray  # [rows] int: rows of one field survey share the id
    sha256: str


def fetch_training_data(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of ``training_data.json``, downloading the wheel once into ``cache``; checks the sha256.

    Safe to call from several processes at once (the test suite's): each downloads into its own directory inside
    ``cache`` and moves the finished files into place, so nobody reads a half-written file.
    """
    path = cache / "training_data.json"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", PACKAGE,
                 "-d", tmp],
                check=True,
            )  # fmt: skip
            (wheel,) = Path(tmp).glob("fractionalcover3-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                for member, name in ((LICENSE_MEMBER, "LICENSE.txt"), (DATA_MEMBER, path.name)):
                    (Path(tmp) / name).write_bytes(archive.read(member))
                    os.replace(Path(tmp) / name, cache / name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DATA_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {DATA_SHA256}; delete it to download again")
    return path


def load_dataset(path: Path) -> Dataset:
    raw = path.read_bytes()
    columns: dict[str, dict[str, float]] = json.loads(raw)
    rows = sorted(columns["pv"], key=int)
    table = {name: np.array([columns[name][r] for r in rows], dtype=np.float64) for name in columns}
    cover = np.stack([table[c] for c in LABEL_COLUMNS], axis=1)
    surveys = [tuple(v) for v in np.stack([table[c] for c in SURVEY_COLUMNS], axis=1)]
    ids = {key: i for i, key in enumerate(dict.fromkeys(surveys))}
    return Dataset(
        reflectance=np.stack([table[c] for c in BAND_COLUMNS], axis=1).astype(np.float32),
        cover=(cover / cover.sum(axis=1, keepdims=True)).astype(np.float32),
        survey=np.array([ids[key] for key in surveys]),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def split(data: Dataset, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: whole surveys, in a seeded random order, until ``held_out`` of the rows."""
    order = np.random.default_rng(config.seed).permutation(int(data.survey.max()) + 1)
    counts = np.bincount(data.survey)
    cumulative = np.cumsum(counts[order])
    held = order[: int(np.searchsorted(cumulative, config.held_out * len(data.survey))) + 1]
    test = np.isin(data.survey, held)
    return np.flatnonzero(~test), np.flatnonzero(test)


def train(data: Dataset, rows: np.ndarray, config: Config) -> FractionalCover:
    """A model trained on ``rows``; bit-reproducible for a given seed on a given machine. Leaves the global RNG
    the deterministic-algorithms flag and the thread count as they were."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(config.seed)
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)  # reductions then do not depend on the machine's core count
            return _fit(data, rows, config)
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _fit(data: Dataset, rows: np.ndarray, config: Config) -> FractionalCover:
    x = torch.from_numpy(data.reflectance[rows])
    y = torch.from_numpy(data.cover[rows])
    model = FractionalCover(dropout=config.dropout)
    f = features(x)
    model.feature_mean.copy_(f.mean(dim=0))
    model.feature_std.copy_(f.std(dim=0))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.epochs)
    shuffle = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        for batch in torch.split(torch.randperm(len(rows), generator=shuffle), config.batch_size):
            loss = (model.predict_pixels(x[batch]) - y[batch]).square().mean()
            optimiser.zero_grad()
            torch.autograd.backward(loss)
            optimiser.step()
        schedule.step()
    return model.eval()


def rmse(model: FractionalCover, data: Dataset, rows: np.ndarray) -> dict[str, float]:
    """Root-mean-square error per fraction on ``rows``."""
    with torch.no_grad():
        predicted = model.predict_pixels(torch.from_numpy(data.reflectance[rows])).numpy()
    errors = np.sqrt(np.mean((predicted - data.cover[rows]) ** 2, axis=0))
    return {name: round(float(e), 4) for name, e in zip(FRACTIONS, errors, strict=True)}


def _metrics(data: Dataset, config: Config, rows: tuple[np.ndarray, np.ndarray], scores: dict[str, Any]) -> Any:
    train_rows, test_rows = rows
    return {
        "model": FractionalCover.VERSION,
        "held_out_rmse": scores["test"],
        "train_rmse": scores["train"],
        "published_rmse_range": [0.11, 0.15],
        "data": {"package": PACKAGE, "member": DATA_MEMBER, "sha256": data.sha256, "rows": len(data.survey),
                 "bands": dict(zip(FractionalCover.BANDS[1:], BAND_COLUMNS, strict=True)), "licence": "MIT"},
        "split": {"method": "by field survey (identical measured cover), seeded permutation", "seed": config.seed,
                  "held_out_fraction": config.held_out, "train_rows": len(train_rows), "held_out_rows": len(test_rows),
                  "held_out_sha256": hashlib.sha256(np.sort(test_rows).astype("<i8").tobytes()).hexdigest()},
        "config": vars(config) | {"hidden": list(FractionalCover.HIDDEN), "features": "bands, log bands, 10 NDs"},
        "training_seconds": scores["seconds"],
        "torch": torch.__version__,
        "command": "python -m gpu_worker.analysis.train_cover",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    args = parser.parse_args(argv)
    config = Config(seed=args.seed, epochs=args.epochs)
    data = load_dataset(fetch_training_data(args.cache))
    train_rows, test_rows = split(data, config)
    started = time.perf_counter()
    model = train(data, train_rows, config)
    seconds = round(time.perf_counter() - started, 2)
    scores = {"test": rmse(model, data, test_rows), "train": rmse(model, data, train_rows), "seconds": seconds}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "fractional_cover.pt")
    metrics = _metrics(data, config, (train_rows, test_rows), scores)
    (args.out / "cover_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({"held_out_rmse": scores["test"], "training_seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
