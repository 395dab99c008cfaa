"""A regular (non-editable) install carries the search spaces: `asl-tune sweep` with no arguments finds cpu-quick.

The spaces live in the top-level search_spaces/ folder; pyproject.toml ships that folder as the package
data of asl_tune.search_spaces. This builds the project's wheel the way `pip install .` or a cluster
node would, checks the YAML files are in it byte for byte, installs it into a folder of its own and runs
asl-tune from there, away from the source tree. It needs setuptools from the package index (pip's
build isolation) and takes some 15-40 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("cpu-quick.yaml", "default.yaml", "seed-iterations.yaml")
# What the build reads: pyproject.toml names README.md as the long description.
SOURCES = ("pyproject.toml", "README.md", "asl_tune", "search_spaces")


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, the folder it was installed into with --target)."""
    base = tmp_path_factory.mktemp("packaging")
    # Build from a copy, so the build's scratch files (build/, *.egg-info) never land in the checkout.
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheels = base / "wheels"
    _pip("wheel", "--no-deps", "-q", "-w", str(wheels), str(src), cwd=base)
    (wheel,) = wheels.glob("asl_tune-*.whl")
    target = base / "site"
    _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel), cwd=base)
    return wheel, target


def _outside_env(target: Path) -> dict[str, str]:
    """This interpreter's environment with only the installed copy of asl_tune in front (dependencies from this venv)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return env


@pytest.mark.slow
def test_the_wheel_ships_the_search_spaces_byte_for_byte(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in SHIPPED:
            member = f"asl_tune/search_spaces/{name}"
            assert member in names, f"{member} is not in {wheel.name}"
            assert zf.read(member) == (ROOT / "search_spaces" / name).read_bytes(), member
    assert not any(n.startswith("search_spaces/") for n in names), "the spaces must ship inside the package, not as a top-level folder"


@pytest.mark.slow
def test_an_installed_copy_resolves_and_loads_the_default_space(installed, tmp_path):
    _, target = installed
    probe = textwrap.dedent(
        """
        import json, sys
        import asl_tune
        from asl_tune.sweep.space import SPACES_DIR, load_space, resolve

        default = resolve(None)
        print(json.dumps({
            "package": asl_tune.__file__,
            "spaces_dir": str(SPACES_DIR),
            "default": str(default),
            "default_name": load_space(default).name,
            "names": {n: str(resolve(n)) for n in ("cpu-quick", "default", "seed-iterations")},
            "loaded": sorted(load_space(resolve(n)).name for n in ("cpu-quick", "default", "seed-iterations")),
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=_outside_env(target), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    inside = target.resolve()
    assert Path(found["package"]).resolve().is_relative_to(inside), f"asl_tune was imported from {found['package']}, not the installed copy"
    assert Path(found["spaces_dir"]).resolve() == inside / "asl_tune" / "search_spaces"
    assert Path(found["default"]).resolve() == inside / "asl_tune" / "search_spaces" / "cpu-quick.yaml"
    assert found["default_name"] == "cpu-quick"
    assert all(Path(p).resolve().is_relative_to(inside) for p in found["names"].values()), found["names"]
    assert found["loaded"] == ["cpu-quick", "default", "seed-iterations"]


@pytest.mark.slow
def test_an_installed_asl_tune_sweep_finds_its_default_space(installed, tmp_path):
    """`asl-tune sweep` with no --space gets past resolving and loading cpu-quick, to a refusal made after both: nothing runs."""
    _, target = installed
    not_a_folder = tmp_path / "results-file"
    not_a_folder.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "asl_tune", "sweep", "--results", str(not_a_folder)],
        cwd=tmp_path,
        env=_outside_env(target),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "--space" not in done.stderr and "search space" not in done.stderr, done.stderr
    assert "--results" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [not_a_folder], "a refused sweep created files"

    missing = subprocess.run(
        [sys.executable, "-m", "asl_tune", "sweep", "--space", "no-such-space", "--results", str(not_a_folder)],
        cwd=tmp_path,
        env=_outside_env(target),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert missing.returncode == 2
    assert "known: cpu-quick, default, seed-iterations" in missing.stderr, missing.stderr
