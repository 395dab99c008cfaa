import math
from pathlib import Path

import numpy as np
import pytest
import torch

from asl_tune import train
from asl_tune.config import TrialConfig
from asl_tune.data import load_dataset
from asl_tune.errors import AslTuneError
from asl_tune.train import (
    CHECKPOINT,
    DEVICE_ENV,
    EPOCH_ROW,
    GPU_RESIDENT_SHARE,
    checkpoint_state,
    device_name,
    gpu_precision,
    keeps_on_device,
    load_checkpoint,
    pick_device,
    pick_precision,
    restore,
    run_epoch,
    save_checkpoint,
    set_up,
    train_epoch,
    train_trial,
)

FAST = dict(image_size=32, head_width=32, batch_size=16, lr=0.02, momentum=0.9)


@pytest.fixture
def dataset(tiny_dataset):
    return load_dataset(tiny_dataset, 32, progress=False, workers=1)


def test_trial_reports_every_epoch_and_final_metrics(dataset):
    seen = []
    result = train_trial(TrialConfig(epochs=2, **FAST), dataset, report=lambda m, ckpt: seen.append(m), threads=1)
    assert result.status == "completed"
    assert [m[EPOCH_ROW]["epoch"] for m in seen] == [1, 2] == [r["epoch"] for r in result.epochs]
    assert seen[1]["images_seen"] == 2 * seen[0]["images_seen"] == 2 * 40  # 5 classes x 8 train frames
    f = result.final
    for key in ("val_accuracy", "test_accuracy", "train_img_per_s", "infer_img_per_s", "latency_ms_p50", "latency_ms_p95"):
        assert math.isfinite(f[key]), key
    assert 0 <= f["test_accuracy"] <= 1 and f["latency_ms_p50"] <= f["latency_ms_p95"]
    assert f["n_parameters"] > 0 and f["device"] == device_name(pick_device()) and f["epochs_completed"] == 2
    cm = np.array(result.confusion)
    assert cm.shape == (5, 5) and cm.sum() == 5 * 2  # 10% test block: 2 frames per class
    assert [r["class_name"] for r in result.per_class] == dataset.classes
    assert "confusion" in seen[-1] and "confusion" not in seen[0]  # the last report carries the test evaluation
    assert "infer_img_per_s" in seen[0]  # speed is known from the first epoch, for trials stopped early


def test_an_epoch_row_holds_that_epochs_figures_and_the_trial_metrics_its_averages(dataset):
    """One meaning everywhere: an epoch's train_img_per_s is its own, the trial's is images_seen / seconds of training."""
    seen = []
    result = train_trial(TrialConfig(epochs=3, **FAST), dataset, report=lambda m, ckpt: seen.append(m), threads=1)
    rows = [m[EPOCH_ROW] for m in seen]
    assert rows == result.epochs  # what a sweep records per epoch is what `train --out` records
    images = np.diff([0] + [r["images_seen"] for r in rows])
    assert list(images) == [40, 40, 40]
    train_seconds = sum(n / r["train_img_per_s"] for n, r in zip(images, rows))  # each epoch's own seconds of training
    assert seen[-1]["train_img_per_s"] == pytest.approx(120 / train_seconds, rel=1e-9)
    assert result.final["train_img_per_s"] == seen[-1]["train_img_per_s"]
    assert rows[-1]["train_img_per_s"] != seen[-1]["train_img_per_s"]  # the last epoch's own, not the average
    # The trial-level keys are the trials.parquet ones; the epoch's figures live in its row only.
    assert not {"epoch", "train_loss", "train_accuracy", "val_loss", "seconds"} & set(seen[0])
    last = {k: v for k, v in seen[-1].items() if k not in (EPOCH_ROW, "confusion", "per_class")}
    assert last.keys() == result.final.keys() and last.pop("train_seconds") <= result.final["train_seconds"]
    assert last == {k: v for k, v in result.final.items() if k != "train_seconds"}  # the trial's metrics, built once


def test_the_checkpoint_a_report_carries_resumes_the_trial(dataset, tmp_path):
    """A sweep saves the state each report hands over (into a fresh folder per report) and resumes from it."""
    config = TrialConfig(epochs=2, **FAST)
    full = train_trial(
        config, dataset, report=lambda m, state: save_checkpoint(tmp_path / f"epoch{m[EPOCH_ROW]['epoch']}", state), threads=1
    )
    assert sorted(p.parent.name for p in tmp_path.rglob("*.pt")) == ["epoch1", "epoch2"]  # no checkpoint_dir: the trainer wrote none itself
    resumed = train_trial(config, dataset, resume=load_checkpoint(tmp_path / "epoch1"), threads=1)
    assert [r["epoch"] for r in resumed.epochs] == [1, 2]
    assert resumed.epochs[1]["train_loss"] == pytest.approx(full.epochs[1]["train_loss"], rel=1e-6)
    assert resumed.final["test_accuracy"] == full.final["test_accuracy"]


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
        if metrics[EPOCH_ROW]["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_trial(config, dataset, checkpoint_dir=tmp_path / "cut", report=die_after_first, threads=1)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 0
    resumed_epochs = []
    resumed = train_trial(
        config,
        dataset,
        checkpoint_dir=tmp_path / "cut",
        resume=load_checkpoint(tmp_path / "cut"),
        report=lambda m, c: resumed_epochs.append(m[EPOCH_ROW]["epoch"]),
        threads=1,
    )
    assert resumed_epochs == [2, 3]  # continued, not restarted
    assert [r["epoch"] for r in resumed.epochs] == [1, 2, 3]
    for a, b in zip(full.epochs, resumed.epochs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.final["test_accuracy"] == full.final["test_accuracy"]


def test_a_corrupt_checkpoint_is_logged_and_the_trial_starts_over(dataset, tmp_path, caplog):
    config = TrialConfig(epochs=2, **FAST)
    first = train_trial(config, dataset, checkpoint_dir=tmp_path, threads=1)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    (tmp_path / CHECKPOINT).write_bytes((tmp_path / CHECKPOINT).read_bytes()[:1000])  # torn write
    assert load_checkpoint(tmp_path) is None  # nothing good: the trial starts over
    assert f"checkpoint {tmp_path / CHECKPOINT} is unreadable" in caplog.text  # detected and logged
    assert "starts over" in caplog.text
    epochs = []
    again = train_trial(
        config, dataset, resume=load_checkpoint(tmp_path), report=lambda m, c: epochs.append(m[EPOCH_ROW]["epoch"]), threads=1
    )
    assert epochs == [1, 2]  # from the first epoch
    assert [r["train_loss"] for r in again.epochs] == pytest.approx(
        [r["train_loss"] for r in first.epochs], rel=1e-6
    )  # the same trial, run again
    assert not list(tmp_path.glob("*.prev.pt"))  # no fallback file is kept: Ray restores only the newest checkpoint


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
    again_checkpoints = []
    second = train_trial(
        config,
        dataset,
        checkpoint_dir=tmp_path,
        resume=load_checkpoint(tmp_path),
        report=lambda m, c: (again.append(m), again_checkpoints.append(c)),
        threads=1,
    )
    assert [m[EPOCH_ROW]["epoch"] for m in again] == [2] and "confusion" in again[0]
    assert again_checkpoints == [None]  # nothing new to keep: the checkpoint restored from is the final one
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


# ---------------------------------------------------------------- the device, its precision and its memory


def test_asl_tune_device_chooses_the_device_and_refuses_what_it_cannot_honour(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(AslTuneError, match=r"^ASL_TUNE_DEVICE: must be cpu or cuda \(or unset: a GPU when there is one\), got 'tpu'$"):
        pick_device()
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU box, on any box
    with pytest.raises(AslTuneError, match=r"^ASL_TUNE_DEVICE: cuda needs a GPU that torch can see, and it sees none, got 'cuda'$"):
        pick_device()
    monkeypatch.delenv(DEVICE_ENV)
    assert pick_device() == torch.device("cpu")  # unset: a GPU when there is one, and here there is none


def test_a_trial_trains_on_the_device_asl_tune_device_names(dataset, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    run = set_up(TrialConfig(epochs=1, **FAST), dataset, threads=1)
    assert run.device == torch.device("cpu") and next(run.model.parameters()).device.type == "cpu"


def test_the_dataset_stays_on_the_gpu_only_when_it_fits_the_trials_share_of_it():
    gib = 2**30
    card = 80 * gib
    assert keeps_on_device(8 * gib, card, 1.0) and keeps_on_device(8 * gib, card, 0.25)
    assert keeps_on_device(int(GPU_RESIDENT_SHARE * card), card, 1.0)  # exactly the budget still fits
    # Four trials on a quarter of the card each: 10 GiB would fit the whole card's budget (32 GiB), four copies would not.
    assert keeps_on_device(10 * gib, card, 1.0) and not keeps_on_device(10 * gib, card, 0.25)
    assert not keeps_on_device(33 * gib, card, 1.0)


def test_gpu_share_must_be_a_fraction_of_one_gpu(dataset):
    with pytest.raises(AslTuneError, match=r"gpu_share: must be in \(0, 1\], got 0"):
        set_up(TrialConfig(epochs=1, **FAST), dataset, gpu_share=0)


def test_precision_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_the_cpu(monkeypatch):
    assert pick_precision(torch.device("cpu")) == "fp32"
    assert gpu_precision(bf16_supported=True) == "bf16" and gpu_precision(bf16_supported=False) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100 or T4
    assert pick_precision(torch.device("cuda")) == "fp16"


def test_a_trial_is_judged_at_the_precision_it_trains_at_and_records_it(dataset, monkeypatch):
    """Validation, test and speed run at the trial's autocast dtype; trials.parquet's `precision` says which."""
    monkeypatch.setattr(train, "pick_precision", lambda device: "bf16")  # as on an H100
    # Record the dtype each stage asks for, and run at fp32: bf16 on a CPU without bf16 units takes seconds per batch.
    judged, trained = [], []
    real_predict, real_autocast = train.predict, train.autocast_to
    monkeypatch.setattr(train, "predict", lambda *a, autocast: judged.append(autocast) or real_predict(*a, autocast=None))
    monkeypatch.setattr(train, "measure_speed", lambda *a, autocast: judged.append(autocast) or {"infer_img_per_s": 1.0})
    monkeypatch.setattr(train, "autocast_to", lambda device, dtype: trained.append(dtype) or real_autocast(device, None))
    result = train_trial(TrialConfig(epochs=1, **FAST), dataset, threads=1)
    assert result.final["precision"] == "bf16"
    assert trained == [torch.bfloat16] * 3  # the 3 batches of 40 training images
    assert judged == [torch.bfloat16] * 3  # validation, speed and test alike


# ---------------------------------------------------------------- divergence, read back every few steps


def _poisoned(run, nan_from_step: int) -> list[int]:
    """Make the network's output NaN from the given training step on; return the list the optimiser's steps are counted in."""
    forward, step = run.model.forward, run.optimizer.step
    calls, steps = [0], []

    def poisoned_forward(x):
        calls[0] += 1
        out = forward(x)
        return out * float("nan") if calls[0] >= nan_from_step else out

    def counted_step(*a, **k):
        steps.append(1)
        return step(*a, **k)

    run.model.forward, run.optimizer.step = poisoned_forward, counted_step
    return steps


@pytest.mark.parametrize("nan_from_step, steps_taken", [(3, 4), (4, 4), (5, 8), (9, 10)])
def test_a_loss_that_turns_non_finite_stops_the_epoch_within_the_check_interval(dataset, monkeypatch, nan_from_step, steps_taken):
    """Checked every 4 steps here: the loss of step 3 is caught after step 4, that of step 9 at the epoch's end (step 10)."""
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 4)
    run = set_up(TrialConfig(epochs=1, **{**FAST, "batch_size": 4}), dataset, threads=1)  # 40 images: 10 steps
    steps = _poisoned(run, nan_from_step)
    loss_sum, correct, seen = train_epoch(run, 0)
    assert run.status == "diverged" and math.isnan(loss_sum)
    assert len(steps) == steps_taken and seen == 4 * steps_taken
    assert len(steps) - nan_from_step < 4  # fewer than DIVERGENCE_CHECK_STEPS steps after the loss turned


def test_a_diverged_epochs_row_says_nan_and_counts_the_images_it_trained_on(dataset, monkeypatch):
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 4)
    run = set_up(TrialConfig(epochs=2, **{**FAST, "batch_size": 4}), dataset, threads=1)
    _poisoned(run, 2)
    row = run_epoch(run, 0)
    assert run.status == "diverged" and row["images_seen"] == 16 == run.images_seen  # stopped at the first check
    assert all(math.isnan(row[k]) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"))


def test_a_huge_learning_rate_diverges_within_the_first_check(dataset):
    """Batch 1: 40 steps an epoch, checked every DIVERGENCE_CHECK_STEPS; lr 1e12 blows up in the first few."""
    result = train_trial(TrialConfig(epochs=3, image_size=32, head_width=32, batch_size=1, lr=1e12, momentum=0.9), dataset, threads=1)
    assert result.status == "diverged" and len(result.epochs) == 1
    assert result.epochs[0]["images_seen"] == train.DIVERGENCE_CHECK_STEPS < 40  # the epoch stopped early
    assert math.isnan(result.epochs[0]["train_loss"]) and math.isnan(result.final["val_accuracy"])


def test_the_training_loop_reads_the_device_only_at_its_checks(dataset, monkeypatch):
    """Each read of a tensor's value waits for the GPU: one per DIVERGENCE_CHECK_STEPS steps, and the epoch's totals at its end."""
    monkeypatch.setattr(train, "DIVERGENCE_CHECK_STEPS", 4)
    run = set_up(TrialConfig(epochs=1, **{**FAST, "batch_size": 4}), dataset, threads=1)  # 10 steps
    reads = []
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: reads.append(_name) or _real(self, *a, **k))
    loss_sum, correct, seen = train_epoch(run, 0)
    monkeypatch.undo()
    assert seen == 40 and math.isfinite(loss_sum) and 0 <= correct <= 40
    assert len(reads) <= 10 // 4 + 2, reads  # checks after steps 4 and 8, then the loss sum and correct count


# ---------------------------------------------------------------- a resumed GPU trial is the same trial


def test_a_checkpoint_keeps_the_gpu_random_state_only_when_on_a_gpu(dataset):
    run = set_up(TrialConfig(epochs=1, **FAST), dataset, threads=1)
    run_epoch(run, 0)
    state = checkpoint_state(run)
    assert train.trial_metrics(run)["precision"] == run.precision == pick_precision(run.device)
    assert ("cuda_rng" in state) == run.on_gpu
    assert ("scaler" in state) == (run.precision == "fp16")
    if run.on_gpu:
        assert len(state["cuda_rng"]) == torch.cuda.device_count()


def test_restore_puts_the_gpu_random_state_back_and_tolerates_checkpoints_without_it(dataset, tmp_path, monkeypatch):
    config = TrialConfig(epochs=2, **FAST)
    train_trial(config, dataset, report=lambda m, state: m[EPOCH_ROW]["epoch"] == 1 and save_checkpoint(tmp_path, state), threads=1)
    old = load_checkpoint(tmp_path)
    old.pop("cuda_rng", None)  # as written on a CPU, or before asl-tune kept it
    run = set_up(config, dataset, threads=1)
    restore(run, old)
    assert run.epochs_done == 1
    # With it, and CUDA there (faked here), the GPU's generators get their state back.
    put_back = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put_back.append)
    gpu_state = torch.arange(16, dtype=torch.uint8)
    run = set_up(config, dataset, device=torch.device("cpu"), threads=1)
    restore(run, {**old, "cuda_rng": [gpu_state, gpu_state + 1]})  # written where two GPUs were visible
    assert len(put_back) == 1 and len(put_back[0]) == 1 and torch.equal(put_back[0][0], gpu_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_resumed_gpu_trial_with_dropout_repeats_the_uninterrupted_one(dataset, tmp_path):
    config = TrialConfig(epochs=2, dropout=0.5, **FAST)  # dropout draws from the GPU's generator
    full = train_trial(
        config, dataset, report=lambda m, state: save_checkpoint(tmp_path / f"epoch{m[EPOCH_ROW]['epoch']}", state), threads=1
    )
    torch.cuda.manual_seed_all(12345)  # the resumed run must not depend on where the GPU's generator happens to be
    resumed = train_trial(config, dataset, resume=load_checkpoint(tmp_path / "epoch1"), threads=1)
    assert resumed.epochs[1]["train_loss"] == pytest.approx(full.epochs[1]["train_loss"], rel=1e-3)
