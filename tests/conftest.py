"""Shared fixtures: tiny real JPEG datasets on disk, in the Kaggle layout, and a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

CLASSES = ["A", "B", "C", "del", "nothing"]  # sorted as ImageFolder sorts: upper case first


def class_image(label: int, frame: int, size: int = 48, seed: int = 0) -> Image.Image:
    """A learnable stand-in image: a class-specific bar position and colour, drifting slowly with the frame, plus noise."""
    rng = np.random.default_rng([seed, label, frame])
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    pos = int((label + 0.5) * size / (len(CLASSES) + 1)) + int(2 * np.sin(frame / 7))
    img[:, pos : pos + size // 8, label % 3] = 220
    return Image.fromarray(img)


def make_dataset(root: Path, per_class: int = 12, classes: list[str] = CLASSES, size: int = 48, seed: int = 0) -> Path:
    """Write <root>/asl_alphabet_train/asl_alphabet_train/<class>/<class><n>.jpg, n = 1..per_class; return root."""
    base = root / "asl_alphabet_train" / "asl_alphabet_train"
    for label, name in enumerate(classes):
        (base / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            class_image(label, n, size, seed).save(base / name / f"{name}{n}.jpg", quality=90)
    return root


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """A private cache for module-scoped fixtures too (they are set up before any function-scoped fixture)."""
    old = os.environ.get("ASL_TUNE_CACHE")
    os.environ["ASL_TUNE_CACHE"] = str(tmp_path_factory.mktemp("session-cache"))
    yield
    if old is None:
        os.environ.pop("ASL_TUNE_CACHE", None)
    else:
        os.environ["ASL_TUNE_CACHE"] = old


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache folder, never the user's."""
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """5 classes x 12 frames of 48 px JPEGs, Kaggle layout."""
    return make_dataset(tmp_path / "data")
