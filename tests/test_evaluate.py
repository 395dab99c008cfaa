"""Judging a network: confusion counts, per-class and pair rates, predictions on the batches the input stage cuts."""

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from asl_tune.data import MEAN, STD, Batcher
from asl_tune.evaluate import MALLOC_TRIM, Timed, autocast_to, confusion_matrix, measure_speed, pair_rates, per_class_rates, predict

CLASSES = ["K", "R", "U", "V"]
# rows: true K, R, U, V; columns: predicted
CM = np.array(
    [
        [4, 0, 0, 0],
        [0, 3, 1, 0],
        [0, 2, 2, 0],
        [0, 0, 0, 0],  # no V in this test set
    ]
)


def test_confusion_matrix_counts_true_classes_by_row():
    true = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 1, 2, 2])
    assert confusion_matrix(true, pred, 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]


def test_per_class_rates_are_nan_where_a_class_is_absent():
    rates = {r["class_name"]: r for r in per_class_rates(CM, CLASSES)}
    assert rates["R"]["support"] == 4 and rates["R"]["recall"] == 0.75 and rates["R"]["fnr"] == 0.25
    assert rates["R"]["precision"] == 3 / 5 and rates["U"]["fpr"] == pytest.approx(1 / 8)
    assert rates["V"]["support"] == 0 and math.isnan(rates["V"]["recall"]) and math.isnan(rates["V"]["precision"])


def test_pair_rates_hold_the_watch_list_then_the_most_confused_pairs():
    rates = pair_rates(CM, CLASSES, top=1)
    assert rates["pair_U_as_R"] == 0.5 and rates["pair_R_as_U"] == 0.25 and rates["pair_K_as_V"] == 0.0
    assert math.isnan(rates["pair_V_as_K"])  # no true V: undefined, not 0
    assert set(rates) == {"pair_U_as_R", "pair_R_as_U", "pair_K_as_V", "pair_V_as_K"}  # the top pair is already watched


def test_predict_judges_the_normalised_batches_of_the_input_stage():
    images = np.stack([np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 200, 255)])  # (3, 8, 8, 3) uint8
    batcher = Batcher(images, torch.device("cpu"), channels_last=False)
    x = batcher.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - m) / s for m, s in zip(MEAN, STD)], rel=1e-5)
    assert x[1, :, 0, 0].tolist() == pytest.approx([-m / s for m, s in zip(MEAN, STD)], rel=1e-5)

    class Brightness(nn.Module):  # class 1 when the image is bright, else class 0
        def forward(self, x):
            b = x.mean(dim=(1, 2, 3))
            return torch.stack([-b, b], dim=1)  # (B, 2)

    pred, loss = predict(Brightness(), batcher, np.array([0, 1, 2]), np.array([0, 1, 1]))
    assert pred.tolist() == [0, 1, 1] and loss > 0


def test_the_input_stage_imports_without_torch():
    """data.py holds the Batcher but imports torch only when one is made, so `asl-tune data check` starts fast."""
    code = "import sys, asl_tune.data; assert 'torch' not in sys.modules, 'asl_tune.data imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


class _Probe(nn.Module):
    """Two classes from a linear layer; remembers the dtype that layer computed in (autocast changes it)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x):
        logits = self.head(x.mean(dim=(2, 3)))  # (B, 3, S, S) -> (B, 2)
        self.dtypes.append(logits.dtype)
        return logits


def test_predict_and_speed_run_at_the_autocast_dtype_they_are_given():
    """A trial is judged at the precision it trains at: the dtype reaches the network; None is full precision."""
    images = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    batcher = Batcher(images, torch.device("cpu"), channels_last=False)
    probe = _Probe()
    predict(probe, batcher, np.arange(4), np.array([0, 1, 0, 1]), autocast=torch.bfloat16)
    assert set(probe.dtypes) == {torch.bfloat16}
    probe.dtypes.clear()
    predict(probe, batcher, np.arange(4), np.array([0, 1, 0, 1]), autocast=None)
    assert set(probe.dtypes) == {torch.float32}
    probe.dtypes.clear()
    measure_speed(probe, batcher, np.arange(4), autocast=torch.bfloat16, budget_s=0.01)
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}


def test_autocast_to_none_is_full_precision():
    lin = nn.Linear(4, 4)
    with autocast_to(torch.device("cpu"), None):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    with autocast_to(torch.device("cpu"), torch.bfloat16):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16


def _four_images() -> Batcher:
    """A CPU Batcher over 4 random 8 px images, for the speed tests (their models ignore what the pixels are)."""
    images = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    return Batcher(images, torch.device("cpu"), channels_last=False)


def test_timed_speed_runs_exactly_the_warm_up_and_timed_counts():
    """With Timed, every call does the same work: warm-up, then exactly that many batches of 64 and single images."""
    batcher = _four_images()
    sizes = []

    class Count(nn.Module):
        def forward(self, x):
            sizes.append(len(x))
            return x.mean(dim=(2, 3))

    speed = measure_speed(Count(), batcher, np.arange(4), timed=Timed(warmup=2, batches=5, latencies=7))
    assert sizes == [64] * (2 + 5) + [1] * (2 + 7)
    assert speed["infer_img_per_s"] > 0 and speed["latency_ms_p95"] >= speed["latency_ms_p50"] > 0


def test_timed_speed_keeps_the_median_group_so_one_stalled_batch_does_not_move_the_figure():
    """Another process taking the cores for one batch (here: one forward pass sleeps 50x longer) spoils one group of
    the timed batches, not the figure: a figure of the whole time would fall about tenfold."""
    batcher = _four_images()
    calls = []

    class Stall(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            if len(x) == 64:
                time.sleep(0.5 if len(calls) == 3 + 2 else 0.01)  # after 3 warm-up runs, the 2nd timed batch stalls
            return x.mean(dim=(2, 3))

    speed = measure_speed(Stall(), batcher, np.arange(4), timed=Timed(warmup=3, batches=5, rounds=5, latencies=3))
    assert calls[: 3 + 5] == [64] * 8
    assert speed["infer_img_per_s"] > 64 / 0.03  # each other group: one 10 ms batch; the whole time would give 64 * 5 / 0.54 = 593


TRIM_PROBE = """
from asl_tune.evaluate import trim_heap
def anon_mb():
    for line in open('/proc/self/smaps_rollup'):
        if line.startswith('Anonymous:'):
            return int(line.split()[1]) // 1024
blocks = [bytes(2048) for _ in range(100_000)]  # 200 MB of malloc'd blocks, each below glibc's mmap threshold
pin = bytes(2048)  # allocated after them: the heap's top stays in use, so free() alone cannot shrink the heap
del blocks
held = anon_mb()
trim_heap()
print(held, anon_mb())
"""


@pytest.mark.skipif(MALLOC_TRIM is None or not os.path.exists("/proc/self/smaps_rollup"), reason="glibc on Linux")
def test_trim_heap_gives_back_what_freed_blocks_below_the_heaps_top_hold():
    """predict calls it after every evaluation: a trial then waits out its next epoch without the evaluation's freed batches."""
    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120)
    held, after = map(int, done.stdout.split())
    assert held - after > 150, (held, after)  # of the 200 MB freed, held until trimmed
