"""One configuration, start to finish: train DexNet, checkpoint every epoch, evaluate at the end.

The trainer knows nothing of Ray. It takes a TrialConfig, decoded arrays and an optional
`report(metrics, checkpoint)` callback called once per epoch; the sweep's trainable wraps it.
`train_trial` reads top to bottom in layers, as flax's `train_and_evaluate`: `set_up` (check,
split, build) and `restore`, then per epoch `run_epoch` (`train_epoch`, the training loop
only, and validation), and `finish` (the final evaluation). A `Run` carries the trial between them.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from asl_tune.config import TrialConfig, config_problems
from asl_tune.data import Batcher, DecodedDataset, Splits, make_splits, subsample
from asl_tune.errors import AslTuneError
from asl_tune.evaluate import autocast_to, confusion_matrix, eval_batch, measure_speed, pair_rates, per_class_rates, predict
from asl_tune.files import write_atomically
from asl_tune.model import DexNet, count_parameters, flops_per_image

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
GPU_RESIDENT_SHARE = 0.4  # keep the uint8 dataset on the GPU when it takes at most this share of the trial's part of its memory
DIVERGENCE_CHECK_STEPS = 20  # optimizer steps between checks that the loss is still finite (each check waits for the GPU)
DEVICE_ENV = "ASL_TUNE_DEVICE"  # "cpu" or "cuda": the device to train on; unset, a GPU when torch sees one
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # a trial's precision -> its autocast dtype
EPOCH_ROW = "epoch_row"  # the key of a report's nested epochs.parquet row (this epoch's own figures)

# report(metrics, checkpoint): metrics as trial_metrics builds them plus EPOCH_ROW (and, at the end, "confusion"
# and "per_class"); checkpoint is the state to save (checkpoint_state), or None when there is nothing new to keep.
# The state shares tensors with the live model and optimiser: save it before returning, not later.
Report = Callable[[dict, "dict | None"], None]


@dataclass
class TrialResult:
    """What one trial produced: its status, one row per epoch, the final metrics and the test confusion matrix."""

    status: str  # "completed" or "diverged"
    config: TrialConfig
    epochs: list[dict] = field(default_factory=list)  # epochs.parquet rows: epoch, train_loss, ..., seconds
    final: dict = field(default_factory=dict)  # trials.parquet metrics (trial_metrics): val/test/external accuracy, speed, pairs, ...
    classes: list[str] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # (K, K) test counts, row = true class
    per_class: list[dict] = field(default_factory=list)  # precision, recall, fpr, fnr per class on test


def pick_device() -> torch.device:
    """The device ASL_TUNE_DEVICE names (cpu or cuda); unset, the first visible GPU, else the CPU."""
    asked = os.environ.get(DEVICE_ENV, "").strip()
    if not asked:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if asked not in ("cpu", "cuda"):
        raise AslTuneError(f"{DEVICE_ENV}: must be cpu or cuda (or unset: a GPU when there is one), got {asked!r}")
    if asked == "cuda" and not torch.cuda.is_available():
        raise AslTuneError(f"{DEVICE_ENV}: cuda needs a GPU that torch can see, and it sees none, got {asked!r}")
    return torch.device(asked)


def pick_precision(device: torch.device) -> str:
    """The precision a trial trains and is judged at on device: "bf16" or "fp16" autocast on a GPU, "fp32" on the CPU."""
    if device.type != "cuda":
        return "fp32"
    return gpu_precision(torch.cuda.is_bf16_supported())


def gpu_precision(bf16_supported: bool) -> str:
    """bf16 where the GPU has it; else fp16, whose gradients a GradScaler keeps from underflowing."""
    return "bf16" if bf16_supported else "fp16"


def keeps_on_device(nbytes: int, total_memory: int, share: float) -> bool:
    """Whether a dataset of nbytes stays on a GPU of total_memory bytes for a trial allowed `share` of it (0 < share <= 1)."""
    return nbytes <= GPU_RESIDENT_SHARE * share * total_memory


def device_name(device: torch.device) -> str:
    """ "cpu", or the GPU's name (as trial rows record it)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write state as folder/checkpoint.pt through a temporary name and a rename: a kill mid-write leaves the old file whole."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(folder: Path) -> dict | None:
    """The checkpoint in folder, or None to start over: there is none, or it is unreadable (logged)."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint is data, never code, whoever wrote it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        log.warning("checkpoint %s is unreadable (%s: %s); the trial starts over", path, type(e).__name__, e)
        return None


@dataclass
class Trained:
    """A trained DexNet ready to classify: the network in eval mode, its class names, and the settings it was trained with."""

    model: nn.Module
    classes: list[str]
    config: TrialConfig
    source: str

    @torch.inference_mode()
    def classify(self, images: np.ndarray, device: torch.device | None = None) -> list[str]:
        """Class names for (N, S, S, 3) uint8 RGB images at S = config.image_size, normalised as in training."""
        images = np.asarray(images)
        size = self.config.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise AslTuneError(
                f"images: must be a (N, {size}, {size}, 3) uint8 RGB array for {self.source}, got {images.dtype} {images.shape}"
            )
        device = device or pick_device()
        model = self.model.to(device)
        batcher = Batcher(np.ascontiguousarray(images), device, channels_last=False)
        rows = torch.arange(len(images))
        step = eval_batch(device)
        preds = [model(batcher.batch(rows[s : s + step])).argmax(1).cpu() for s in range(0, len(rows), step)]
        return [self.classes[i] for i in torch.cat(preds).tolist()] if preds else []


def load_trained(where: str | Path) -> Trained:
    """The network a trial trained, from its checkpoint.pt, or the folder that holds one (a path, or a URI pyarrow opens).

    trials.parquet's `checkpoint` column names the folder of each trial's last checkpoint.
    """
    import io

    where = str(where)
    path = where if where.endswith(".pt") else f"{where.rstrip('/')}/{CHECKPOINT}"
    try:
        if "://" in path:
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            with filesystem.open_input_file(inner) as f:
                blob = io.BytesIO(f.read())
        else:
            blob = io.BytesIO(Path(path).read_bytes())
        state = torch.load(blob, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:  # missing, unreachable, torn, or not a torch file
        raise AslTuneError(f"{where}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "config" not in state or "classes" not in state:
        raise AslTuneError(
            f"{where}: this checkpoint does not record its settings and classes (written before asl-tune saved them); retrain to load it"
        )
    settings = dict(state["config"])
    settings.setdefault("split_seed", settings.get("seed", 0))  # written before the split had a seed of its own
    config = TrialConfig(**settings)
    model = DexNet(config.head_width, config.image_size, len(state["classes"]), config.dropout)
    model.load_state_dict(state["model"])
    return Trained(model.eval(), list(state["classes"]), config, where)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(max(1, int(threads)))


@dataclass
class Run:
    """One trial between its layers: what set_up built, and what the epochs have added since."""

    config: TrialConfig
    dataset: DecodedDataset
    external: DecodedDataset | None  # other people's images, scored at the end only
    device: torch.device
    splits: Splits
    train_rows: np.ndarray  # the training rows this trial uses: data_fraction of splits.train
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batcher: Batcher
    labels: torch.Tensor  # (N,) int64 class of every image, on the device
    started: float  # time.perf_counter() when set-up began
    precision: str = "fp32"  # "bf16", "fp16" or "fp32" (pick_precision): training, validation and test alike
    scaler: torch.amp.GradScaler | None = None  # fp16 only: scales the loss so small gradients survive
    status: str = "completed"  # or "diverged"
    history: list[dict] = field(default_factory=list)  # one epochs.parquet row per finished epoch
    images_seen: int = 0  # training images over every epoch, those before a resume included
    train_compute_s: float = 0.0  # seconds inside training loops (no validation): the average img/s's denominator
    speed: dict = field(default_factory=dict)  # inference speed, measured once: the architecture decides it, not the weights

    @property
    def on_gpu(self) -> bool:
        """Whether the trial runs on a GPU (channels-last, autocast)."""
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the trial's precision; None for fp32."""
        return AUTOCAST[self.precision]

    @property
    def epochs_done(self) -> int:
        """Epochs finished so far, which is also the 0-based number of the next one."""
        return len(self.history)


def train_trial(
    config: TrialConfig,
    dataset: DecodedDataset,
    external: DecodedDataset | None = None,
    report: Report | None = None,
    checkpoint_dir: Path | None = None,
    resume: dict | None = None,
    threads: int | None = None,
    device: torch.device | None = None,
    gpu_share: float = 1.0,
) -> TrialResult:
    """Train and evaluate one configuration; continue from `resume` (a checkpoint from load_checkpoint) when given.

    gpu_share is how much of the GPU this trial may use (Ray's fraction when trials share one); it sizes
    what the trial keeps in GPU memory.
    """
    run = set_up(config, dataset, external, threads, device, gpu_share)
    if resume is not None:
        restore(run, resume)
    evaluation = None
    for epoch in range(run.epochs_done, config.epochs):
        row = run_epoch(run, epoch)
        if run.status == "diverged":
            _report(report, run, row, None, None)  # no checkpoint: the weights are not sound
            break
        if epoch == config.epochs - 1:
            evaluation = finish(run)
        state = checkpoint_state(run)
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir), state)
        _report(report, run, row, evaluation, state)
    if evaluation is None and run.status == "completed":
        # Restored from the final checkpoint (the process died after saving it, before the report went
        # out): evaluate again and send the last epoch's row with the final metrics. No new checkpoint:
        # the one restored from is already the final one.
        evaluation = finish(run)
        _report(report, run, run.history[-1], evaluation, None)
    out = TrialResult(
        status=run.status, config=config, epochs=run.history, final=trial_metrics(run, evaluation), classes=list(dataset.classes)
    )
    if evaluation is not None:
        out.confusion, out.per_class = evaluation["confusion"], evaluation["per_class"]
    return out


def set_up(
    config: TrialConfig,
    dataset: DecodedDataset,
    external: DecodedDataset | None = None,
    threads: int | None = None,
    device: torch.device | None = None,
    gpu_share: float = 1.0,
) -> Run:
    """Check the config against the data, split it, and build the network, optimiser and batcher on the device."""
    problems = config_problems(asdict(config))
    if problems:
        raise AslTuneError("; ".join(f"{k}: {why}, got {v!r}" for k, why, v in problems))
    if dataset.image_size != config.image_size:
        raise AslTuneError(f"image_size: the dataset was decoded at {dataset.image_size} px but the config asks for {config.image_size}")
    if not 0 < gpu_share <= 1:
        raise AslTuneError(f"gpu_share: must be in (0, 1], got {gpu_share!r}")
    _set_threads(threads)
    device = device or pick_device()
    on_gpu = device.type == "cuda"
    started = time.perf_counter()

    splits = make_splits(dataset.labels, dataset.frames, config.split, config.split_seed)
    train_rows = subsample(splits.train, dataset.labels, config.data_fraction, config.seed)
    if len(train_rows) == 0 or len(splits.val) == 0:
        raise AslTuneError(f"--data: too few images to split ({len(dataset.labels)}); each class needs at least 3")

    torch.manual_seed(config.seed)
    model = DexNet(config.head_width, config.image_size, len(dataset.classes), config.dropout).to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # every batch has the same image size: time the conv algorithms once, keep the fastest
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    batcher = Batcher(dataset.images, device, channels_last=on_gpu)
    if on_gpu and keeps_on_device(dataset.images.nbytes, torch.cuda.get_device_properties(device).total_memory, gpu_share):
        batcher.to_device()  # else each batch crosses from pinned host memory (Batcher.batch)
    labels = torch.from_numpy(dataset.labels).to(device)
    precision = pick_precision(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return Run(
        config,
        dataset,
        external,
        device,
        splits,
        train_rows,
        model,
        optimizer,
        batcher,
        labels,
        started,
        precision=precision,
        scaler=scaler,
    )


def restore(run: Run, state: dict) -> None:
    """Put a checkpoint's weights, optimiser, random state and history back, so the next epoch is the one it stopped before."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # absent: a CPU trial, or written before it was kept
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])
    if state.get("scaler") is not None and run.scaler is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.history = [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]
    for row in run.history:  # stored as one float64 tensor
        row["epoch"] = int(row["epoch"])
        row["images_seen"] = int(row["images_seen"])
    assert run.epochs_done == int(state["epoch"]) + 1, "a checkpoint holds one history row per epoch"
    run.images_seen = int(state["images_seen"])
    run.train_compute_s = float(state["train_compute_s"])
    log.info("resumed at epoch %d of %d", run.epochs_done + 1, run.config.epochs)


def run_epoch(run: Run, epoch: int) -> dict:
    """Train one epoch, then validate; return its epochs.parquet row (NaN losses and accuracies if it diverged)."""
    t0 = time.perf_counter()
    loss_sum, correct, seen = train_epoch(run, epoch)
    train_s = time.perf_counter() - t0
    run.images_seen += seen
    run.train_compute_s += train_s
    img_per_s = seen / max(train_s, 1e-9)  # this epoch's own throughput; trial_metrics has the trial's average
    if run.status == "diverged":
        log.warning("loss became non-finite in epoch %d: trial diverged", epoch + 1)
        nan = float("nan")
        row = _epoch_row(epoch, nan, nan, nan, nan, img_per_s, run.images_seen, time.perf_counter() - t0)
        run.history.append(row)
        return row
    val_pred, val_loss = predict(run.model, run.batcher, run.splits.val, run.dataset.labels, autocast=run.amp_dtype)
    val_acc = float((val_pred == run.dataset.labels[run.splits.val]).mean())
    row = _epoch_row(epoch, loss_sum / seen, correct / seen, val_loss, val_acc, img_per_s, run.images_seen, time.perf_counter() - t0)
    run.history.append(row)
    if not run.speed:  # from the first epoch on, so a trial stopped early has it too
        run.speed = measure_speed(run.model, run.batcher, run.splits.val, autocast=run.amp_dtype)
    log.info("epoch %d/%d: loss %.4f, val accuracy %.4f, %.0f img/s", epoch + 1, run.config.epochs, row["train_loss"], val_acc, img_per_s)
    return row


def train_epoch(run: Run, epoch: int) -> tuple[float, int, int]:
    """The training loop of one epoch: (summed loss, correct predictions, images); a non-finite loss stops it as diverged.

    The loss and correct counts add up on the device, and the loop reads them back only every
    DIVERGENCE_CHECK_STEPS steps and at the end (each read waits for the GPU): a loss that turns
    non-finite is followed by fewer than DIVERGENCE_CHECK_STEPS more steps, and its NaN reaches the sum.
    """
    run.model.train()
    # The order of each epoch depends only on (seed, epoch), so a resumed trial sees the same batches.
    gen = torch.Generator().manual_seed(run.config.seed * 100_003 + epoch)
    order = torch.from_numpy(run.train_rows)[torch.randperm(len(run.train_rows), generator=gen)]
    # The indices cross to the GPU once an epoch: a blocking copy each step would wait for the GPU each step.
    image_rows, label_rows = order.to(run.batcher.rows_device), order.to(run.device)
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    for step, s in enumerate(range(0, len(order), run.config.batch_size), start=1):
        e = s + run.config.batch_size
        x, y = run.batcher.batch(image_rows[s:e]), run.labels[label_rows[s:e]]  # (B, 3, S, S) float, (B,) int64
        with autocast_to(run.device, run.amp_dtype):
            logits = run.model(x)  # (B, K)
        loss = loss_fn(logits.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is None:
            loss.backward()
            run.optimizer.step()
        else:  # fp16: scaled so small gradients survive; a step whose gradients overflowed is skipped
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        loss_sum += loss.detach() * len(y)  # cross-entropy is >= 0: the sum is finite while every loss is
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum):
            break
    loss_total = float(loss_sum)
    if not math.isfinite(loss_total):
        run.status = "diverged"
    return loss_total, int(correct), seen


def finish(run: Run) -> dict:
    """The final evaluation: inference speed if not yet measured, test (and external) accuracy, confusions, per-class rates."""
    if not run.speed:  # a trial restored from its final checkpoint measured none in this process
        run.speed = measure_speed(run.model, run.batcher, run.splits.val, autocast=run.amp_dtype)
    classes, labels, test = run.dataset.classes, run.dataset.labels, run.splits.test
    metrics: dict = {}
    if len(test):
        pred, test_loss = predict(run.model, run.batcher, test, labels, autocast=run.amp_dtype)
        cm = confusion_matrix(labels[test], pred, len(classes))  # (K, K)
        metrics.update(test_accuracy=float(np.trace(cm) / cm.sum()), test_loss=test_loss, **pair_rates(cm, classes))
    else:
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
        metrics.update(test_accuracy=float("nan"), test_loss=float("nan"))
    metrics["external_accuracy"] = float("nan")
    if run.external is not None:
        ext_batcher = Batcher(run.external.images, run.device, channels_last=run.on_gpu)
        ext_pred, _ = predict(run.model, ext_batcher, np.arange(len(run.external.labels)), run.external.labels, autocast=run.amp_dtype)
        metrics["external_accuracy"] = float((ext_pred == run.external.labels).mean())
    return {"metrics": metrics, "confusion": cm.tolist(), "per_class": per_class_rates(cm, classes)}


def trial_metrics(run: Run, evaluation: dict | None = None) -> dict:
    """The trial's metrics so far, flat, as its trials.parquet row holds them (the one place they are assembled).

    `train_img_per_s` is the average over the trial's epochs (images seen / seconds of training);
    each epoch's own is in its row.
    """
    finite = [r for r in run.history if math.isfinite(r["val_accuracy"])]
    return {
        "status": run.status,
        # A diverged trial has no accuracy to rank by: NaN tells the searcher the trial failed.
        "val_accuracy": finite[-1]["val_accuracy"] if finite and run.status != "diverged" else float("nan"),
        "epochs_completed": len(finite),
        "images_seen": run.images_seen,
        "train_img_per_s": run.images_seen / run.train_compute_s if run.train_compute_s > 0 else float("nan"),
        "train_seconds": time.perf_counter() - run.started,
        "n_parameters": count_parameters(run.model),
        "flops_per_image": flops_per_image(run.model),  # forward, one image: exact, unlike the speed figures
        "device": device_name(run.device),
        "precision": run.precision,  # what it trained and was judged at
        "hostname": platform.node(),
        **run.speed,  # infer_img_per_s, latency_ms_p50/p95, keeps_up_30fps
        **(evaluation["metrics"] if evaluation else {}),  # test_accuracy, test_loss, external_accuracy, pair_*
    }


def _report(report: Report | None, run: Run, row: dict, evaluation: dict | None, checkpoint: dict | None) -> None:
    """Send one epoch's report: the trial's metrics, the epoch's own row under EPOCH_ROW, the test evaluation at the end."""
    if report is None:
        return
    metrics = {**trial_metrics(run, evaluation), EPOCH_ROW: row}
    if evaluation is not None:
        metrics.update(confusion=evaluation["confusion"], per_class=evaluation["per_class"])
    report(metrics, checkpoint)


def checkpoint_state(run: Run) -> dict:
    """What a checkpoint holds: enough to continue after the last finished epoch, and to rebuild the network alone (load_trained).

    On a GPU it keeps the GPU's random state too (dropout draws from it there), and fp16's loss scale.
    """
    gpu = {"cuda_rng": torch.cuda.get_rng_state_all()} if run.on_gpu else {}
    if run.scaler is not None:
        gpu["scaler"] = run.scaler.state_dict()
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "epoch": run.epochs_done - 1,  # 0-based: the last epoch finished
        "images_seen": run.images_seen,
        "train_compute_s": run.train_compute_s,
        "history_keys": list(run.history[0].keys()),
        "history": torch.tensor([list(r.values()) for r in run.history], dtype=torch.float64),
        "config": asdict(run.config),
        "classes": list(run.dataset.classes),
        **gpu,
    }


def _epoch_row(
    epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float, img_per_s: float, images_seen: int, seconds: float
) -> dict:
    return {
        "epoch": epoch + 1,  # 1-based, as users count epochs
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "train_img_per_s": img_per_s,  # this epoch's images / its seconds in the training loop
        "images_seen": images_seen,  # over the trial so far
        "seconds": seconds,  # the epoch's training and validation
    }
