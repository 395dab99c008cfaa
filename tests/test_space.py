from pathlib import Path

import pytest
import yaml

from asl_tune.errors import AslTuneError
from asl_tune.sweep.space import SPACES_DIR, load_space, resolve

BASE = {
    "name": "t",
    "metric": "val_accuracy",
    "mode": "max",
    "num_samples": 2,
    "fixed": {"image_size": 32},
    "params": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
}


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_builds_configs(path):
    space = load_space(path)
    assert space.name == path.stem
    assert space.params and space.num_samples >= len(space.points)
    dists = {k: p.to_optuna() for k, p in space.params.items()}
    for name, dist in dists.items():  # both ends of every range make a valid trial
        for value in [dist.low, dist.high] if hasattr(dist, "low") else list(dist.choices):
            assert getattr(space.config({name: value}), name) == value


def test_shipped_spaces_are_the_ones_users_are_promised():
    assert {"cpu-quick", "default", "seed-iterations"} <= {p.stem for p in SPACES_DIR.glob("*.yaml")}
    seed = load_space(SPACES_DIR / "seed-iterations.yaml")
    runs = {(p["head_width"], p["epochs"], p["data_fraction"]) for p in seed.points}
    assert runs == {(512, 10, 1.0), (128, 12, 1.0), (512, 17, 0.35)}
    assert seed.fixed["image_size"] == 200 and seed.fixed["lr"] == 0.008 and not seed.early_stopping
    assert load_space(SPACES_DIR / "default.yaml").fixed["image_size"] == 200
    assert load_space(resolve(None)).name == "cpu-quick"


def _write(tmp_path, content) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _with(**changes):
    raw = {**BASE, **changes}
    return {k: v for k, v in raw.items() if v is not ...}


def _param(**spec):
    return _with(params={"lr": {"type": "float", "low": 0.001, "high": 0.1, **spec}})


REFUSALS = [
    ("", r"s.yaml: the file is empty"),
    ("- 1\n- 2\n", r"s.yaml: must be a mapping of keys .*got a list"),
    ("name: t\nparams:\n  lr: {type: float\n", r"s.yaml: YAML syntax error at line 4"),
    (_with(colour="blue"), r"s.yaml: colour: unknown key"),
    (_with(params={"depth": {"type": "int", "low": 1, "high": 3}}), r"params.depth: unknown parameter"),
    (_param(type="gaussian"), r"params.lr.type: unknown type .*got 'gaussian'"),
    (_param(low=0.5, high=0.01), r"params.lr: `low <= high` must hold, but got \(low=0.5, high=0.01\)"),
    (_param(low=0.0, log=True), r"params.lr: `low > 0` must hold for `log=True`, but got \(low=0.0, high=0.1\)"),
    (
        _with(params={"head_width": {"type": "categorical", "choices": []}}),
        r"params.head_width.choices: must be a non-empty list, got \[\]",
    ),
    (
        _with(params={"data_fraction": {"type": "float", "low": 0.5, "high": 1.5}}),
        r"params.data_fraction.high: must be in \(0, 1\], got 1.5",
    ),
    (_with(params={"epochs": {"type": "int", "low": 0, "high": 3}}), r"params.epochs.low: must be >= 1, got 0"),
    (
        _with(params={"head_width": {"type": "categorical", "choices": [1, 64]}}),
        r"params.head_width.choices: every choice must be >= 2, got 1",
    ),
    (_with(fixed={"data_fraction": 0}), r"fixed.data_fraction: must be in \(0, 1\], got 0"),
    (_with(metric="accuracy"), r"metric: unknown metric .*got 'accuracy'"),
    (_with(mode="maximise"), r"mode: must be max or min, got 'maximise'"),
    (_with(num_samples=0), r"num_samples: must be a positive integer, got 0"),
    (_with(num_samples=2.5), r"num_samples: must be a positive integer, got 2.5"),
    (_with(params=...), r"params: must name at least one setting to search"),
    (_with(params={}), r"params: must name at least one setting to search"),
    (_with(objectives=[{"metric": "val_accuracy", "mode": "up"}]), r"objectives\[0\].mode: must be max or min"),
    (_with(fixed={"lr": 0.1}), r"params.lr: is also under fixed"),
    (_param(step=0.01, log=True), r"params.lr: The parameter `step` is not supported when `log` is true"),
    (_param(step=-0.01), r"params.lr: `step > 0` must hold, but got step=-0.01"),
    (_with(params={"epochs": {"type": "float", "low": 1, "high": 3}}), r"params.epochs.type: epochs is an integer setting"),
    (_with(points=[{"lr": 5.0}]), r"points\[0\].lr: must lie in \[0.001, 0.1\], got 5.0"),
    (_with(early_stopping={"reduction_factor": 1}), r"early_stopping.reduction_factor: must be a number > 1, got 1"),
    (_with(sampler="grid"), r"sampler: must be one of tpe, random, got 'grid'"),
]


@pytest.mark.parametrize(
    "content, message", REFUSALS, ids=[m.split(":")[0 if not m.startswith("s.yaml") else 1].strip()[:40] for _, m in REFUSALS]
)
def test_bad_space_refused_naming_file_key_rule_and_value(tmp_path, content, message):
    with pytest.raises(AslTuneError, match=message) as info:
        load_space(_write(tmp_path, content))
    assert str(info.value).startswith("s.yaml: ") and "\n" not in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(AslTuneError) as info:
        load_space(_write(tmp_path, _with(mode="up", num_samples=-1, colour=1)))
    msg = str(info.value)
    assert "mode: must be max or min" in msg and "num_samples: must be a positive integer" in msg and "colour: unknown key" in msg


def test_yaml_is_never_evaluated_as_code(tmp_path):
    with pytest.raises(AslTuneError, match="YAML syntax error|could not determine a constructor"):
        load_space(_write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nparams: {}\n"))


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(AslTuneError, match=r"--space: no file 'nope' .*known: .*cpu-quick"):
        resolve("nope")


def test_the_spaces_folder_holds_the_top_level_files_themselves():
    """Installed or not, the shipped spaces are the repository's search_spaces/*.yaml, byte for byte (never copies that drift)."""
    top = Path(__file__).resolve().parent.parent / "search_spaces"
    shipped = sorted(p.name for p in top.glob("*.yaml"))
    assert shipped and sorted(p.name for p in SPACES_DIR.glob("*.yaml")) == shipped
    for name in shipped:
        assert (SPACES_DIR / name).read_bytes() == (top / name).read_bytes(), name
    assert resolve("default") == SPACES_DIR / "default.yaml"


def test_the_spaces_are_found_as_package_data_and_in_an_uninstalled_source_tree(monkeypatch, tmp_path):
    """importlib.resources' asl_tune.search_spaces when the package maps it; the source tree's folder when nothing does."""
    import importlib.resources

    from asl_tune.sweep import space

    installed = tmp_path / "site-packages" / "asl_tune" / "search_spaces"
    installed.mkdir(parents=True)
    real_files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files", lambda pkg: installed if pkg == space.SPACES_PACKAGE else real_files(pkg))
    assert space._spaces_dir() == installed

    def not_installed(pkg):
        raise ModuleNotFoundError(f"No module named {pkg!r}")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    assert space._spaces_dir() == Path(space.__file__).resolve().parents[2] / "search_spaces"  # asl_tune/sweep/space.py -> the checkout
