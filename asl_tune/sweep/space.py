"""Search spaces: YAML files in Optuna's short form, validated once, before anything starts.

    name: cpu-quick
    metric: val_accuracy
    mode: max
    num_samples: 8
    fixed: {image_size: 64}
    params:
      lr: {type: float, low: 1.0e-3, high: 5.0e-2, log: true}

Every problem is reported as `<file>: <key>: <rule>, got <value>`, with the key as the user typed it.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asl_tune.config import TrialConfig, check_value, coerce
from asl_tune.errors import AslTuneError

# Metrics a trial reports every epoch, so the searcher and early stopping can use them.
SEARCH_METRICS = (
    "val_accuracy",
    "val_loss",
    "train_accuracy",
    "train_loss",
    "train_img_per_s",
    "infer_img_per_s",
    "latency_ms_p50",
    "latency_ms_p95",
    "n_parameters",
    "flops_per_image",
)
TOP_KEYS = ("name", "description", "metric", "mode", "objectives", "num_samples", "fixed", "params", "points", "sampler", "early_stopping")
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
SAMPLERS = ("tpe", "random")
EARLY_STOPPING_KEYS = ("reduction_factor", "grace_epochs")
SPACES_PACKAGE = "asl_tune.search_spaces"  # the top-level search_spaces/ folder, shipped as package data (pyproject.toml)


def _spaces_dir() -> Path:
    """The folder of the shipped search spaces.

    Installed (a wheel, `pip install .` or `pip install -e .`), they are the package data of
    asl_tune.search_spaces, which setuptools maps onto the top-level search_spaces/ folder; from a
    source tree that was never installed, that folder itself.
    """
    from importlib.resources import files

    try:
        found = files(SPACES_PACKAGE)
        folder = Path(str(found))
        if folder.is_dir():
            return folder
    except (ImportError, TypeError, ValueError):  # not installed: no such package; or not a plain folder
        pass
    return Path(__file__).resolve().parents[2] / "search_spaces"


SPACES_DIR = _spaces_dir()


@dataclass(frozen=True)
class Param:
    """One searched setting, in Optuna's terms."""

    type: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def to_optuna(self):
        """The matching optuna.distributions object."""
        from optuna import distributions as d

        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return d.CategoricalDistribution(list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: what to search, what to hold fixed, what to optimise."""

    name: str  # the sweep's default name
    source: str  # the file it came from
    metric: str  # what early stopping and (with one objective) the searcher optimise
    mode: str  # "max" or "min"
    objectives: tuple[tuple[str, str], ...]  # (metric, mode) pairs the searcher optimises
    num_samples: int  # trials in the sweep
    fixed: dict[str, Any] = field(default_factory=dict)  # settings held at one value
    params: dict[str, Param] = field(default_factory=dict)  # settings searched
    points: tuple[dict, ...] = ()  # configurations tried first, exactly as given (Optuna's points to evaluate)
    sampler: str = "tpe"  # "tpe" (multi-objective TPE with several objectives) or "random"
    reduction_factor: float = 3.0  # ASHA keeps the best 1/reduction_factor at each rung; 0 turns early stopping off
    grace_epochs: float = 1.0  # ASHA's first rung, in full-training-split epochs of images seen
    description: str = ""

    @property
    def early_stopping(self) -> bool:
        """Whether ASHA may stop trials early."""
        return self.reduction_factor > 0

    def max_epochs(self) -> int:
        """The most epochs any trial of this space can run."""
        if "epochs" in self.params:
            p = self.params["epochs"]
            return int(max(p.choices) if p.type == "categorical" else p.high)
        return int(self.fixed.get("epochs", TrialConfig().epochs))

    def max_fraction(self) -> float:
        """The largest data_fraction any trial of this space can use."""
        if "data_fraction" in self.params:
            p = self.params["data_fraction"]
            return float(max(p.choices) if p.type == "categorical" else p.high)
        return float(self.fixed.get("data_fraction", 1.0))

    def seeded(self, seed: int) -> "SearchSpace":
        """This space in a sweep run with --seed: every trial splits the data with it, and trains with it unless the space sets seed itself."""
        fixed = dict(self.fixed)
        for key in ("split_seed", "seed"):
            if key not in self.fixed and key not in self.params:
                fixed[key] = seed
        return dataclasses.replace(self, fixed=fixed)

    def config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The TrialConfig of one trial: defaults, then fixed settings, then the sampled ones."""
        return TrialConfig(**{**self.fixed, **{k: coerce(k, v) for k, v in sampled.items()}})


def _short_repr() -> reprlib.Repr:
    """How a bad value is shown: cut short, so a YAML alias nested a billion items wide or a 10**400 stays one short line."""
    shown = reprlib.Repr()  # Python 3.11's takes no keyword arguments
    shown.maxlevel, shown.maxstring, shown.maxlong, shown.maxother = 3, 80, 40, 80
    return shown


_SHOWN = _short_repr()


class _Problems:
    """Collects every problem in a file, then raises once with all of them."""

    def __init__(self, source: str):
        self.source, self.items = source, []

    def add(self, key: str, rule: str, value: Any = None, show_value: bool = True) -> None:
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)  # a line break in a key stays on the one line
        self.items.append(f"{key}: {rule}" + (f", got {_SHOWN.repr(value)}" if show_value else ""))

    def raise_if_any(self) -> None:
        if self.items:
            raise AslTuneError(f"{self.source}: " + "; ".join(self.items))


def resolve(space: str | Path | None) -> Path:
    """A space argument as a file: a path, or the name of a file in search_spaces/ (default cpu-quick)."""
    if space is None:
        space = "cpu-quick"
    path = Path(space)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise AslTuneError(f"--space: file does not exist: {path}")
        return path
    candidate = SPACES_DIR / f"{space}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))) or "none found"
    raise AslTuneError(f"--space: no file {space!r} and no search space of that name in {SPACES_DIR} (known: {known})")


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file (safe_load only: nothing in it runs as code)."""
    import yaml

    path = Path(path)
    src = path.name
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]  # a ReaderError's own text runs over two lines
        raise AslTuneError(f"{src}: YAML syntax error at {where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise AslTuneError(f"{src}: must be UTF-8 text, got byte {e.object[e.start]:#04x} at offset {e.start}") from None
    except RecursionError:
        raise AslTuneError(f"{src}: nested too deeply to read (a search space needs 4 levels)") from None
    except OSError as e:
        raise AslTuneError(f"--space: cannot read {path}: {e.strerror}") from None
    if raw is None:
        raise AslTuneError(f"{src}: the file is empty; it must be a mapping with at least `params`")
    if not isinstance(raw, dict):
        raise AslTuneError(f"{src}: must be a mapping of keys (name, metric, params, ...), got a {type(raw).__name__}")
    try:
        return parse_space(raw, src, default_name=path.stem)
    except RecursionError:  # showing a value nested hundreds deep in the message
        raise AslTuneError(f"{src}: nested too deeply to read (a search space needs 4 levels)") from None


def parse_space(raw: dict, src: str, default_name: str) -> SearchSpace:
    """Validate a search space already read into a dict; raise once with every problem."""
    bad = _Problems(src)
    for key in raw:
        if key not in TOP_KEYS:
            bad.add(str(key), f"unknown key (known: {', '.join(TOP_KEYS)})", show_value=False)

    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name.startswith("."):
        bad.add("name", "must be a non-empty string without '/' or NUL, not starting with '.'", name)

    metric, mode = raw.get("metric", "val_accuracy"), raw.get("mode", "max")
    _check_metric(bad, "metric", metric)
    _check_mode(bad, "mode", mode)
    objectives = _parse_objectives(bad, raw, metric, mode)

    num_samples = raw.get("num_samples", 8)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        bad.add("num_samples", "must be a positive integer", num_samples)

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        bad.add("fixed", "must be a mapping of setting: value", fixed)
        fixed = {}
    for k, v in fixed.items():
        if (why := check_value(k, v)) is not None:
            bad.add(f"fixed.{k}", why, v)

    params = _parse_params(bad, raw.get("params"), fixed)

    points = _parse_points(bad, raw.get("points", []), params, num_samples)

    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        bad.add("sampler", f"must be one of {', '.join(SAMPLERS)}", sampler)
    reduction_factor, grace = _parse_early_stopping(bad, raw.get("early_stopping", True))
    description = raw.get("description", "")
    if not isinstance(description, str):
        bad.add("description", "must be a string", description)
    bad.raise_if_any()
    return SearchSpace(
        name=name,
        source=src,
        metric=metric,
        mode=mode,
        objectives=tuple(objectives),
        num_samples=num_samples,
        fixed={k: coerce(k, v) for k, v in fixed.items()},
        params=params,
        points=tuple(points),
        sampler=sampler,
        reduction_factor=float(reduction_factor),
        grace_epochs=float(grace),
        description=description,
    )


def _parse_objectives(bad: _Problems, raw: dict, metric: Any, mode: Any) -> list[tuple[str, str]]:
    """`objectives`: (metric, mode) pairs; without the key, the space's one metric and mode."""
    objectives: list[tuple[str, str]] = []
    if "objectives" in raw:
        objs = raw["objectives"]
        if not isinstance(objs, list) or not objs:
            bad.add("objectives", "must be a non-empty list of {metric, mode}", objs)
            return objectives
        for i, o in enumerate(objs):
            if not isinstance(o, dict) or set(o) - {"metric", "mode"} or "metric" not in o:
                bad.add(f"objectives[{i}]", "must be a mapping {metric: ..., mode: max|min}", o)
                continue
            ok = _check_metric(bad, f"objectives[{i}].metric", o["metric"])
            ok &= _check_mode(bad, f"objectives[{i}].mode", o.get("mode", "max"))
            if ok:
                objectives.append((o["metric"], o.get("mode", "max")))
    if not objectives and isinstance(metric, str) and isinstance(mode, str):
        objectives = [(metric, mode)]
    return objectives


def _parse_params(bad: _Problems, params_raw: Any, fixed: dict) -> dict[str, Param]:
    """`params`: each searched setting as a Param; none may also be fixed."""
    params: dict[str, Param] = {}
    if not params_raw:
        bad.add("params", "must name at least one setting to search", params_raw)
    elif not isinstance(params_raw, dict):
        bad.add("params", "must be a mapping of setting: distribution", params_raw)
    else:
        for k, spec in params_raw.items():
            p = _parse_param(bad, str(k), spec)
            if p is not None:
                params[k] = p
            if k in fixed:
                bad.add(f"params.{k}", "is also under fixed; a setting is either searched or fixed", show_value=False)
    return params


def _parse_early_stopping(bad: _Problems, es: Any) -> tuple[float, float]:
    """`early_stopping`: true (defaults), false (off: reduction factor 0) or {reduction_factor, grace_epochs}."""
    reduction_factor, grace = 3.0, 1.0
    if es is False:
        return 0.0, grace
    if isinstance(es, dict):
        for k in es:
            if k not in EARLY_STOPPING_KEYS:
                bad.add(f"early_stopping.{k}", f"unknown key (known: {', '.join(EARLY_STOPPING_KEYS)})", show_value=False)
        reduction_factor = es.get("reduction_factor", reduction_factor)
        grace = es.get("grace_epochs", grace)
        if not _is_number(reduction_factor) or reduction_factor <= 1:
            bad.add("early_stopping.reduction_factor", "must be a number > 1", reduction_factor)
        if not _is_number(grace) or grace <= 0:
            bad.add("early_stopping.grace_epochs", "must be a number > 0", grace)
    elif es is not True:
        bad.add("early_stopping", "must be true, false or a mapping {reduction_factor, grace_epochs}", es)
    return reduction_factor, grace


def _is_number(v: Any) -> bool:
    """Whether v is a finite int or float (10**400 is not: it has no float, and Optuna works in floats)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    return abs(v) <= sys.float_info.max and math.isfinite(v)


def _check_metric(bad: _Problems, key: str, metric: Any) -> bool:
    if metric not in SEARCH_METRICS:
        bad.add(key, f"unknown metric (known: {', '.join(SEARCH_METRICS)})", metric)
        return False
    return True


def _check_mode(bad: _Problems, key: str, mode: Any) -> bool:
    if mode not in ("max", "min"):
        bad.add(key, "must be max or min", mode)
        return False
    return True


def _parse_points(bad: _Problems, raw: Any, params: dict[str, Param], num_samples: Any) -> list[dict]:
    """`points`: a list of {setting: value} giving every searched setting, each value inside its distribution."""
    if not isinstance(raw, list):
        bad.add("points", "must be a list of mappings {setting: value}", raw)
        return []
    points = []
    for i, point in enumerate(raw):
        key = f"points[{i}]"
        if not isinstance(point, dict):
            bad.add(key, "must be a mapping {setting: value}", point)
            continue
        n = len(bad.items)
        for k in point:
            if k not in params:
                bad.add(f"{key}.{k}", f"is not a searched parameter (searched: {', '.join(params)})", show_value=False)
        for k, p in params.items():
            if k not in point:
                bad.add(key, f"must give every searched parameter; {k} is missing", show_value=False)
                continue
            v = point[k]
            inside = v in p.choices if p.type == "categorical" else (_is_number(v) and p.low <= v <= p.high)
            if not inside:
                rule = f"must be one of {list(p.choices)}" if p.type == "categorical" else f"must lie in [{p.low}, {p.high}]"
                bad.add(f"{key}.{k}", rule, v)
        if len(bad.items) == n:
            points.append({k: coerce(k, v) for k, v in point.items()})
    if isinstance(num_samples, int) and len(points) > num_samples:
        bad.add(
            "points",
            f"lists {len(points)} points but num_samples is {num_samples}; it must be at least the number of points",
            show_value=False,
        )
    return points


def _parse_param(bad: _Problems, name: str, spec: Any) -> Param | None:
    """One `params.<name>` entry as a Param, or None after recording why not."""
    key = f"params.{name}"
    if name not in TrialConfig.field_names():
        bad.add(key, f"unknown parameter (known: {', '.join(TrialConfig.field_names())})", show_value=False)
        return None
    if not isinstance(spec, dict) or "type" not in spec:
        bad.add(key, "must be a mapping with a type (float, int or categorical)", spec)
        return None
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in PARAM_KEYS:
        bad.add(f"{key}.type", "unknown type (known: float, int, categorical)", kind)
        return None
    n = len(bad.items)
    for k in spec:
        if k not in PARAM_KEYS[kind]:
            bad.add(f"{key}.{k}", f"unknown key for a {kind} (known: {', '.join(sorted(PARAM_KEYS[kind]))})", show_value=False)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            bad.add(f"{key}.choices", "must be a non-empty list", choices)
            return None
        for c in choices:
            if (why := check_value(name, c)) is not None:
                bad.add(f"{key}.choices", f"every choice {why}", c)
        return Param("categorical", choices=tuple(coerce(name, c) for c in choices)) if len(bad.items) == n else None

    want = int if kind == "int" else (int, float)
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    for k, v in (("low", low), ("high", high)):
        if not isinstance(v, want) or not _is_number(v):
            bad.add(f"{key}.{k}", f"must be {'an integer' if kind == 'int' else 'a number'}", v)
    if len(bad.items) > n:
        return None
    if not isinstance(log, bool):
        bad.add(f"{key}.log", "must be true or false", log)
    elif step is not None and (not isinstance(step, want) or not _is_number(step)):
        bad.add(f"{key}.step", f"must be {'an integer' if kind == 'int' else 'a number'}", step)
    else:  # the distribution's own rules (low <= high, low > 0 with log, step > 0, no step with log): Optuna's words
        cast = int if kind == "int" else float
        try:
            Param(kind, low=cast(low), high=cast(high), log=log, step=None if step is None else cast(step)).to_optuna()
        except ValueError as e:
            bad.add(key, str(e).rstrip("."), show_value=False)
    if TrialConfig.field_type(name) is int and kind == "float":
        bad.add(f"{key}.type", f"{name} is an integer setting: use type int or categorical", kind)
    if TrialConfig.field_type(name) is str:
        bad.add(f"{key}.type", f"{name} is a choice of strings: use type categorical", kind)
    for k, v in (("low", low), ("high", high)):  # the trainer's rules are monotone: both ends decide
        if len(bad.items) == n and (why := check_value(name, coerce(name, v))) is not None:
            bad.add(f"{key}.{k}", why, v)
    if len(bad.items) > n:
        return None
    cast = int if kind == "int" else float
    return Param(kind, low=cast(low), high=cast(high), log=log, step=None if step is None else cast(step))
