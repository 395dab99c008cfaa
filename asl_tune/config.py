"""One trial's settings: a frozen dataclass, and the rules each field must obey.

The rules live here once. The CLI (`--lr`), search-space files (`params.lr`) and the
trainer all check against them, each naming the value the way its user typed it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

SPLITS = ("blocked", "random")


def _setting(default: Any, help: str) -> Any:
    """A TrialConfig field: its default and what it is, in words (the CLI's --help is made from these)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrialConfig:
    """Everything that decides what one trial trains and how; defaults are the seed notebook's."""

    head_width: int = _setting(512, "width of the head's first Linear layer; the second is head_width // 2 (the seed also tried 128)")
    lr: float = _setting(0.008, "SGD learning rate")
    momentum: float = _setting(0.0, "SGD momentum, in [0, 1) (the seed used none)")
    weight_decay: float = _setting(0.0, "SGD L2 penalty")
    dropout: float = _setting(0.5, "dropout probability in the head, in [0, 1) (short CPU runs learn far faster with 0)")
    epochs: int = _setting(10, "passes over the (possibly subsampled) training split (the seed ran 10-17 on a GPU)")
    data_fraction: float = _setting(1.0, "share of the training split used, in (0, 1]; val and test stay whole")
    batch_size: int = _setting(64, "training batch size, in images")
    image_size: int = _setting(200, "square input side in px (the seed: 200; use 32-64 on a CPU)")
    split: str = _setting(
        "blocked", "blocked: contiguous frame blocks per class, honest; random: the seed's, flattered by near-duplicate frames"
    )
    seed: int = _setting(0, "seeds the weights, the shuffling and the data_fraction subsample")
    split_seed: int = _setting(0, "seeds which frames go to train/val/test with split random; a sweep holds it for every trial")

    @classmethod
    def field_help(cls, name: str) -> str:
        """What setting `name` is, in words."""
        return cls.__dataclass_fields__[name].metadata["help"]

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every setting, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_type(cls, name: str) -> type:
        """The Python type of setting `name` (int, float or str)."""
        return {"int": int, "float": float, "str": str}[str(cls.__dataclass_fields__[name].type)]


def _positive(v: Any) -> bool:
    return v > 0


# name -> (test, the rule in words). Values have the right type by the time these run.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "head_width": (lambda v: v >= 2, "must be >= 2"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "must be > 0"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: v >= 0 and math.isfinite(v), "must be >= 0 and finite"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "epochs": (lambda v: v >= 1, "must be >= 1"),
    "data_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "batch_size": (_positive, "must be >= 1"),
    "image_size": (lambda v: v >= 32, "must be >= 32 (DexNet's conv stack needs at least 32 px)"),
    "split": (lambda v: v in SPLITS, f"must be one of {', '.join(SPLITS)}"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "split_seed": (lambda v: v >= 0, "must be >= 0"),
}
assert set(RULES) == set(TrialConfig.field_names()), "every setting needs a rule"


def check_value(name: str, value: Any) -> str | None:
    """Return why `value` is not allowed for setting `name`, or None when it is."""
    if name not in RULES:
        return f"is not a setting (known: {', '.join(TrialConfig.field_names())})"
    want = TrialConfig.field_type(name)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > sys.float_info.max:  # 10**400 has no float
            return "must be a finite number"
        value = float(value)
    if not isinstance(value, want) or isinstance(value, bool):
        return f"must be {want.__name__}"
    test, rule = RULES[name]
    return None if test(value) else rule


def coerce(name: str, value: Any) -> Any:
    """Convert an int to float where the setting is a float (YAML writes 1 for 1.0)."""
    if TrialConfig.field_type(name) is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_problems(values: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Every (setting, rule, value) that `values` breaks; empty when all hold."""
    problems = []
    for name, value in values.items():
        why = check_value(name, value)
        if why is not None:
            problems.append((name, why, value))
    return problems


@dataclass(frozen=True)
class Timed:
    """A fixed number of runs for measure_speed, instead of its time budget: the same work on every call."""

    warmup: int = 3  # untimed runs of each kind first: first-call allocation and kernel selection stay out
    batches: int = 20  # timed batches of 64 (infer_img_per_s)
    rounds: int = 5  # the batches are timed in this many equal groups and the median group's rate kept: a burst of other work spoils one group, not the figure
    latencies: int = 100  # timed single images (latency_ms_p50 / p95)
