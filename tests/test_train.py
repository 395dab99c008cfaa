import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asl_tune.config import TrialConfig
from asl_tune.data import load_dataset
from asl_tune.errors import AslTuneError
from asl_tune.train import CHECKPOINT, PREVIOUS, load_checkpoint, train_trial

FAST = dict(image_size=32, head_width=32, batch_size=16, lr=0.02, momentum=0.9)


@pytest.fixture
def dataset(tiny_dataset):
    return load_dataset(tiny_dataset, 32, progress=False, workers=1)


def test_trial_reports_every_epoch_and_final_metrics(dataset):
    seen = []
    result = train_trial(TrialConfig(epochs=2, **FAST), dataset, report=lambda m, ckpt: seen.append(m), threads=1)
    assert result.status == "completed"
    assert [m["epoch"] for m in seen] == [1, 2] == [r["epoch"] for r in result.epochs]
    assert seen[1]["images_seen"] == 2 * seen[0]["images_seen"] == 2 * 40  # 5 classes x 8 train frames
    f = result.final
    for key in ("val_accuracy", "test_accuracy", "train_img_per_s", "infer_img_per_s", "latency_ms_p50", "latency_ms_p95"):
        assert math.isfinite(f[key]), key
    assert 0 <= f["test_accuracy"] <= 1 and f["latency_ms_p50"] <= f["latency_ms_p95"]
    assert f["n_parameters"] > 0 and f["device"] == "cpu" and f["epochs_completed"] == 2
    cm = np.array(result.confusion)
    assert cm.shape == (5, 5) and cm.sum() == 5 * 2  # 10% test block: 2 frames per class
    assert [r["class_name"] for r in result.per_class] == dataset.classes
    assert "confusion" in seen[-1] and "confusion" not in seen[0]  # the last report carries the test evaluation
    assert "infer_img_per_s" in seen[0]  # speed is known from the first epoch, for trials stopped early


def test_fraction_trains_on_fewer_images(dataset):
    result = train_trial(TrialConfig(epochs=1, data_fraction=0.5, **FAST), dataset, threads=1)
    assert result.final["images_seen"] == 20


def test_nan_loss_ends_as_diverged_not_a_crash(dataset):
    result = train_trial(TrialConfig(epochs=3, image_size=32, head_width=32, lr=1e12, momentum=0.9), dataset, threads=1)
    assert result.status == "diverged"
    assert math.isnan(result.final["val_accuracy"])
    assert result.final["epochs_completed"] < 3


def _weights(folder):
    return load_checkpoint(folder)["model"]


def test_interrupted_trial_continues_identically_from_its_checkpoint(dataset, tmp_path):
    config = TrialConfig(epochs=3, **FAST)
    full = train_trial(config, dataset, checkpoint_dir=tmp_path / "full", threads=1)

    class Killed(Exception):
        pass

    def die_after_first(metrics, ckpt):
        if metrics["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_trial(config, dataset, checkpoint_dir=tmp_path / "cut", report=die_after_first, threads=1)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 0
    resumed_epochs = []
    resumed = train_trial(config, dataset, checkpoint_dir=tmp_path / "cut", resume_from=tmp_path / "cut", report=lambda m, c: resumed_epochs.append(m["epoch"]), threads=1)
    assert resumed_epochs == [2, 3]  # continued, not restarted
    assert [r["epoch"] for r in resumed.epochs] == [1, 2, 3]
    for a, b in zip(full.epochs, resumed.epochs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.final["test_accuracy"] == full.final["test_accuracy"]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(dataset, tmp_path, caplog):
    train_trial(TrialConfig(epochs=2, **FAST), dataset, checkpoint_dir=tmp_path, threads=1)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    (tmp_path / CHECKPOINT).write_bytes((tmp_path / CHECKPOINT).read_bytes()[:1000])  # torn write
    assert load_checkpoint(tmp_path)["epoch"] == 0
    assert f"checkpoint {tmp_path / CHECKPOINT} is unreadable" in caplog.text  # detected and logged
    (tmp_path / PREVIOUS).write_bytes(b"garbage")
    assert load_checkpoint(tmp_path) is None  # nothing good: the trial starts over


def test_invalid_config_refused_with_every_problem(dataset):
    with pytest.raises(AslTuneError, match=r"lr: must be > 0, got -1.0; data_fraction: must be in \(0, 1\], got 1.5"):
        train_trial(TrialConfig(lr=-1.0, data_fraction=1.5, image_size=32), dataset)


def test_image_size_must_match_the_decoded_dataset(dataset):
    with pytest.raises(AslTuneError, match="decoded at 32 px but the config asks for 64"):
        train_trial(TrialConfig(image_size=64), dataset)


def test_trial_restored_from_its_final_checkpoint_reports_final_metrics_again(dataset, tmp_path):
    config = TrialConfig(epochs=2, **FAST)
    first = train_trial(config, dataset, checkpoint_dir=tmp_path, threads=1)
    again = []
    second = train_trial(config, dataset, checkpoint_dir=tmp_path, resume_from=tmp_path, report=lambda m, c: again.append(m), threads=1)
    assert [m["epoch"] for m in again] == [2] and "confusion" in again[0]
    assert second.final["test_accuracy"] == first.final["test_accuracy"]
    assert second.final["images_seen"] == first.final["images_seen"]


class _Payload:
    """Unpickling this runs code: it touches a file. A checkpoint must never be able to do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(dataset, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "epoch": 0, "payload": _Payload(marker)}, tmp_path / CHECKPOINT)
    assert load_checkpoint(tmp_path) is None  # refused: the trial starts over
    assert not marker.exists()
