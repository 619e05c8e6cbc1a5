"""Helpers shared by test files: tiny image folders, a tiny SR run config, weight comparisons.
Import them as ``from helpers import ...`` (``tests/`` is on sys.path under pytest: conftest.py
lives there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from dynconv.train import checkpoint as ckpt


def _write_png(path: Path, size: int, rng: np.random.Generator) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
    img = np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))  # blocky: some structure to learn
    img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def make_sr_data(root: Path, train: int = 6, test: int = 2, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            _write_png(root / split / f"img{i}.png", size, rng)
    return root


def make_class_data(root: Path, per_class: int = 4, size: int = 8) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", 1)):
        for c in ("cat", "dog"):
            for i in range(n):
                _write_png(root / split / c / f"{i}.png", size, rng)
    return root


def sr_config(root: Path, **sections) -> dict:
    cfg = {
        "model": {"name": "sr_switched", "options": {"channels": 4, "num_layers": 3,
                                                      "layer": {"breadth": 3, "norm_buffer": 2}}},
        "data": {"name": "sr_folder", "root": str(root), "options": {"scale": 2},
                 "train_options": {"patch_size": 12}},
        "train": {"steps": 4, "batch_size": 2, "seed": 0},
        "losses": [{"name": "l1"}],
        "optim": {"name": "adamw", "lr": 0.01},
        "eval": {"every": 100},
        "log": {"every": 1, "checkpoint_every": 100, "progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.latest_checkpoint(Path(run_dir) / "checkpoints") / ckpt.MODEL_FILE)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
