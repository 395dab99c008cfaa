"""The procedural dataset: Kaggle layout, determinism, video-like drift, no hand in `nothing`, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from asl_tune import data, synth
from asl_tune.alphabet import ASL_CLASSES, is_lookalike
from asl_tune.config import TrialConfig
from asl_tune.errors import AslTuneError
from asl_tune.train import train_trial

PER_CLASS = 3
PX = 64  # small images keep the renders fast; the layout and logic do not depend on size


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A 3-frames-per-class dataset rendered once with the default (parallel) worker count."""
    out = tmp_path_factory.mktemp("synth") / "asl"
    return synth.render_dataset(out, per_class=PER_CLASS, seed=0, image_px=PX, progress=False)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_matches_the_kaggle_zip(small_dataset):
    train = small_dataset / "asl_alphabet_train" / "asl_alphabet_train"
    test = small_dataset / "asl_alphabet_test" / "asl_alphabet_test"
    assert sorted(p.name for p in train.iterdir()) == sorted(ASL_CLASSES)
    for c in ASL_CLASSES:
        assert sorted(p.name for p in (train / c).iterdir()) == [f"{c}{n}.jpg" for n in range(1, PER_CLASS + 1)]
    test_names = sorted(p.name for p in test.iterdir())
    assert len(test_names) == 28
    assert "del_test.jpg" not in test_names
    assert test_names == sorted(f"{c}_test.jpg" for c in ASL_CLASSES if c != "del")
    for path in [train / "M" / "M2.jpg", train / "nothing" / "nothing1.jpg", test / "space_test.jpg"]:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (PX, PX))
    # Nothing else: no leftover partial folders beside the dataset.
    assert [p.name for p in small_dataset.parent.iterdir()] == [small_dataset.name]


def test_same_seed_gives_identical_files_whatever_the_worker_count(small_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "RENDER_WORKERS", 1)
    again = synth.render_dataset(tmp_path / "again", per_class=PER_CLASS, seed=0, image_px=PX, progress=False)
    files = _files(small_dataset)
    assert files == _files(again)
    assert all((small_dataset / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_a_class_subset_renders_only_those_classes_and_the_same_pixels(small_dataset, tmp_path):
    subset = synth.render_dataset(tmp_path / "sub", per_class=PER_CLASS, seed=0, image_px=PX, progress=False, classes=["V", "del", "A"])
    train = subset / "asl_alphabet_train" / "asl_alphabet_train"
    assert sorted(p.name for p in train.iterdir()) == ["A", "V", "del"]
    test = subset / "asl_alphabet_test" / "asl_alphabet_test"
    assert sorted(p.name for p in test.iterdir()) == ["A_test.jpg", "V_test.jpg"]  # no del_test, as in Kaggle's
    for f in ("A/A1.jpg", "V/V3.jpg", "del/del2.jpg"):
        assert (train / f).read_bytes() == (small_dataset / "asl_alphabet_train" / "asl_alphabet_train" / f).read_bytes()
    with pytest.raises(AslTuneError, match="classes: must be a non-empty subset"):
        synth.render_dataset(tmp_path / "bad", per_class=1, image_px=PX, progress=False, classes=["A", "Å"])


def test_different_seed_gives_different_images():
    for c in ("A", "R", "nothing"):
        a = np.asarray(synth.render_image(c, 1, PER_CLASS, seed=0, image_px=PX), dtype=np.int16)
        b = np.asarray(synth.render_image(c, 1, PER_CLASS, seed=1, image_px=PX), dtype=np.int16)
        assert np.abs(a - b).mean() > 10


def test_neighbouring_frames_are_near_copies_and_distant_ones_are_not():
    near, far = [], []
    for c in ("B", "S", "V", "nothing"):
        frames = {n: np.asarray(synth.render_image(c, n, 150, 0, PX), dtype=np.float32) for n in (40, 41, 120)}
        near.append(np.abs(frames[40] - frames[41]).mean())
        far.append(np.abs(frames[40] - frames[120]).mean())
    # Neighbours differ by sensor noise and a little jitter (about 10 levels); 80 frames of drift by about
    # twice as much or more (the scene loops, so distant frames can share a background; the hand still moves).
    assert max(near) < 15
    assert min(f / n for f, n in zip(far, near)) > 1.8


def test_nothing_has_no_hand_and_letters_do():
    for frame in (1, 75, 150):
        assert not synth.render_hand_mask("nothing", frame, 150, 0, PX).any()
    for c in ("A", "B", "L", "P", "del", "space"):
        share = synth.render_hand_mask(c, 20, 150, 0, PX).mean()
        assert 0.08 < share < 0.6, (c, share)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"per_class": 0}, "--per-class: must be >= 1, got 0"),
        ({"image_px": 16}, "--image-px: must be >= 32, got 16"),
        ({"seed": -1}, "--seed: must be >= 0, got -1"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(AslTuneError, match=message):
        synth.render_dataset(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_to_render_into_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AslTuneError, match="already exists and is not empty"):
        synth.render_dataset(tmp_path / "out", per_class=1, image_px=PX, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_interrupted_render_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "RENDER_WORKERS", 1)
    real_render = synth._render_to_file
    calls = []

    def fail_midway(task):
        calls.append(task)
        if len(calls) == 20:
            raise KeyboardInterrupt
        real_render(task)

    monkeypatch.setattr(synth, "_render_to_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        synth.render_dataset(tmp_path / "out", per_class=2, image_px=PX, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_dataset_renders_once_then_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path))
    first = synth.ensure_default_dataset(progress=False, per_class=2, seed=3)
    assert first == synth.default_dataset_dir(per_class=2, seed=3)
    assert first.parent == tmp_path
    assert synth.SYNTH_VERSION in first.name and "pc2" in first.name and "s3" in first.name
    probe = first / "asl_alphabet_train" / "asl_alphabet_train" / "A" / "A1.jpg"
    stamp = probe.stat().st_mtime_ns
    with Image.open(probe) as img:
        assert img.size == (synth.DEFAULT_IMAGE_PX, synth.DEFAULT_IMAGE_PX)

    monkeypatch.setattr(synth, "_render_atomically", lambda *a, **k: pytest.fail("re-rendered a cached dataset"))
    assert synth.ensure_default_dataset(progress=False, per_class=2, seed=3) == first
    assert probe.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_default_dataset_dir_follows_the_cache_root(monkeypatch, tmp_path):
    name = f"synth-{synth.SYNTH_VERSION}-pc{synth.DEFAULT_PER_CLASS}-s0"
    monkeypatch.delenv("ASL_TUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert synth.default_dataset_dir() == tmp_path / ".cache" / "asl-tune" / name
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synth.default_dataset_dir() == tmp_path / "xdg" / "asl-tune" / name
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "mine"))
    assert synth.default_dataset_dir() == tmp_path / "mine" / name
    assert synth.default_dataset_dir().parent == data.cache_root()


def test_dexnet_at_40px_learns_the_default_dataset_and_confuses_look_alike_letters():
    """The embedded dataset is learnable but not trivial, and its mistakes fall where fingerspelling's do.

    The real trainer, on the real default dataset (rendered into this test's cache folder), at 40 px for
    8 epochs (about 2 minutes on 2 CPU cores; at 64 px, 3.5 minutes, it reached 0.59 with 74% of its errors
    inside the groups, at 40 px 0.44 and 63%): accuracy well above chance (1/29) yet clearly under 100%,
    and most test errors between letters of one look-alike group (R/U/V/K/H/W, the fist family, G/Q, K/P,
    I/J/Y ...), which hold about an eighth of all (true, predicted) pairs.
    """
    dataset = data.load_dataset(synth.ensure_default_dataset(progress=False), 40, progress=False)
    config = TrialConfig(head_width=256, lr=0.01, momentum=0.9, dropout=0.0, epochs=8, batch_size=16, image_size=40)
    result = train_trial(config, dataset, threads=2)
    cm = np.array(result.confusion)
    classes = result.classes
    accuracy = np.trace(cm) / cm.sum()
    errors = [(classes[t], classes[p], cm[t, p]) for t in range(len(classes)) for p in range(len(classes)) if t != p and cm[t, p]]
    inside = sum(n for t, p, n in errors if is_lookalike(t, p))
    total = sum(n for _, _, n in errors)
    pairs = [(a, b) for a in classes for b in classes if a != b]
    by_chance = sum(is_lookalike(a, b) for a, b in pairs) / len(pairs)
    assert result.status == "completed"
    assert 0.35 < accuracy < 0.9, accuracy
    assert by_chance < 0.15
    assert inside / total > 0.5, (inside, total, sorted(errors, key=lambda e: -e[2])[:10])
