"""Fuzzed input (issue 18 §4): mutated search spaces, command-line values and image files are each accepted and
work, or refused with one AslTuneError line (exit 2 at the command line), never a traceback, and leave nothing behind.

CI runs the "ci" profile: a few hundred cases in all, derandomized, so a run is reproducible. Set
ASL_TUNE_FUZZ_EXAMPLES=5000 to run that many cases per test once (bench/RESULTS.md records such a run).
No case trains or starts Ray: the command line is given a --data folder that does not exist, so every value it
accepts is then refused at the data, and what it refuses is refused before.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import yaml
from conftest import make_dataset
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asl_tune.cli import main
from asl_tune.config import config_problems
from asl_tune.data import IMAGE_SUFFIXES, cache_root, load_dataset
from asl_tune.errors import AslTuneError
from asl_tune.sweep.space import SPACES_DIR, load_space

EXAMPLES = int(os.environ.get("ASL_TUNE_FUZZ_EXAMPLES", "0"))


def fuzz(ci_examples: int):
    """Hypothesis settings: ci_examples cases in CI (derandomized), or ASL_TUNE_FUZZ_EXAMPLES when set."""
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


def one_line(text: str) -> str:
    """The one line a refusal printed: no traceback, nothing else."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def listing(*folders: Path) -> set[str]:
    """Every path under the folders: what a refusal must leave as it found it."""
    return {str(p) for f in folders for p in f.rglob("*")}


# ---------------------------------------------------------------- search spaces

SHIPPED = {p.name: yaml.safe_load(p.read_text()) for p in sorted(SPACES_DIR.glob("*.yaml"))}
HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1, 1e308, -1e308, float("inf"), float("-inf"), float("nan")])
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(),
    st.text(max_size=30),
    st.just(""),
    st.sampled_from(["float", "int", "categorical", "max", "min", "val_accuracy", "tpe", "lr", "epochs", "image_size"]),
)
WEIRD = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12) | st.integers(), inner, max_size=4),
    max_leaves=12,
)
TAGS = [
    "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!timestamp 2001-12-14",
    "!!float .nan",
    "!!str 7",
    "!!int '12'",
    "!!omap [a: 1]",
    "!custom 1",
]


def paths(doc) -> list[tuple]:
    """Every key path into a nested YAML document (dicts and lists), the empty one first."""
    found = [()]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        found += [(k, *rest) for rest in paths(v)]
    return found


@st.composite
def mutated_doc(draw) -> dict:
    """A shipped space with 1-3 mutations: a value replaced, a key removed, an unknown key added."""
    doc = yaml.safe_load(yaml.safe_dump(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(doc)))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "remove", "add"])) if path else "add"
        target = parent[path[-1]] if path else doc
        if action == "replace":
            parent[path[-1]] = draw(WEIRD)
        elif action == "remove" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(target, dict):
            target[draw(st.text(max_size=12) | st.sampled_from(["lr", "step", "log", "choices", "points"]))] = draw(WEIRD)
    return doc


def laughs(key: str) -> str:
    """A billion laughs: anchors nine aliases wide, eight deep (9**9 items), given to `key`; aliases are shared, not copied, but showing the value must stay short."""
    levels = "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    return f"x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]\n{levels}{key}: *a8\n"


@st.composite
def space_text(draw) -> str:
    """The YAML text of a mutated space, sometimes with a tag, an anchor and aliases, deep nesting, or raw bytes spliced in."""
    text = yaml.safe_dump(draw(mutated_doc()), allow_unicode=True, sort_keys=False)
    extra = draw(st.sampled_from(["none", "tag", "alias", "deep", "splice"]))
    if extra == "tag":
        text += f"{draw(st.sampled_from(['name', 'fixed', 'params', 'num_samples']))}: {draw(st.sampled_from(TAGS))}\n"
    elif extra == "alias":
        text = laughs(draw(st.sampled_from(["name", "num_samples", "sampler", "description", "fixed"]))) + text
    elif extra == "deep":
        n = draw(st.integers(50, 1200))  # deeper is one explicit example: each costs seconds
        text += f"{draw(st.sampled_from(['params', 'name', 'fixed']))}: {'[' * n}{']' * n}\n"
    elif extra == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8)) + text[at:]
    return text


def configs(space) -> list[dict]:
    """Settings a space can give a trial: each searched setting at each end (or choice), the others at their first; and each point."""
    values = {k: list(p.choices) if p.type == "categorical" else [p.low, p.high] for k, p in space.params.items()}
    base = {k: v[0] for k, v in values.items()}
    found = [{**base, k: v} for k, vs in values.items() for v in vs]
    return found + [dict(point) for point in space.points]


def check_space_file(path: Path) -> None:
    """A space file is accepted and every trial it can make is a valid TrialConfig, or refused in one line naming the file."""
    try:
        space = load_space(path)
    except AslTuneError as e:
        assert one_line(str(e)).startswith((f"{path.name}: ", "--space: ")), str(e)
        assert len(str(e)) < 5000
        return
    for p in space.params.values():
        p.to_optuna()  # Optuna takes every accepted distribution
    for sampled in configs(space.seeded(0)):
        config = space.seeded(0).config(sampled)
        assert config_problems(dataclasses.asdict(config)) == [], (sampled, config)


@fuzz(100)
@given(text=space_text())
@example(text="params: {lr: {type: float, low: 1, high: " + "1" * 400 + "}}")  # OverflowError: int too large to convert to float
@example(text="fixed: {lr: " + "9" * 400 + "}\nparams: {epochs: {type: int, low: 1, high: 2}}")
@example(text="points: [{epochs: " + "9" * 400 + "}]\nparams: {epochs: {type: int, low: 1, high: 2}}")
@example(text="early_stopping: {reduction_factor: " + "9" * 400 + "}\nparams: {epochs: {type: int, low: 1, high: 2}}")
@example(text="params: {lr: {type: float, low: 0.1, high: 0.2, step: " + "9" * 400 + "}}")
@example(text="params: {epochs: {type: [int]}}")  # TypeError: unhashable type: 'list'
@example(text="params: {epochs: {type: {a: 1}}}")
@example(text="params: " + "[" * 10000 + "]" * 10000)  # RecursionError
@example(text=laughs("name") + "params: {epochs: {type: int, low: 1, high: 2}}\n")  # the message would have shown 9**9 items
@example(text="fixed: {weight_decay: .inf}\nparams: {epochs: {type: int, low: 1, high: 2}}")  # accepted, then every step diverged
@example(text='name: "a\\0b"\nparams: {epochs: {type: int, low: 1, high: 2}}')  # a folder name with NUL: ValueError later
@example(text="\t\x00")  # a ReaderError's message runs over two lines
@example(text='params: {epochs: {type: int, low: 1, high: 2}}\n? "a\\nb"\n: 1\n')  # a key with a line break
def test_fuzzed_search_spaces_are_accepted_and_work_or_refused_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("space") / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    check_space_file(path)


@fuzz(30)
@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe\x00params")  # UnicodeDecodeError
def test_a_space_file_of_raw_bytes_is_refused_in_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("space") / "bytes.yaml"
    path.write_bytes(data)
    check_space_file(path)


def test_every_shipped_space_is_accepted_and_works():
    for path in sorted(SPACES_DIR.glob("*.yaml")):
        check_space_file(path)
        assert load_space(path).name == path.stem


# ---------------------------------------------------------------- command-line values

# Text a shell can pass: no NUL (execve refuses it), nothing that names a remote filesystem (that would go to the network).
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20).filter(lambda s: "://" not in s)
NUMBER_TEXT = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    HUGE.map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "0x10", "1_000", " 3", "", "３"]),
)
VALUE = ARG_TEXT | NUMBER_TEXT
TRAIN_OPTIONS = [
    "--head-width",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--dropout",
    "--epochs",
    "--data-fraction",
    "--batch-size",
    "--image-size",
    "--split",
    "--seed",
    "--split-seed",
    "--threads",
    "--out",
    "--data",
    "--external",
]
SWEEP_OPTIONS = [
    "--space",
    "--name",
    "--results",
    "--num-samples",
    "--max-concurrent",
    "--cpus-per-trial",
    "--gpus-per-trial",
    "--storage",
    "--seed",
    "--data",
    "--external",
]
ANALYZE_OPTIONS = ["--objectives", "--speed-on", "--threads", "--results"]


@st.composite
def command_line(draw) -> list[str]:
    """An asl-tune command whose options hold fuzzed values; its --data (or sweep name, or weights) never exists."""
    command = draw(st.sampled_from(["train", "sweep", "analyze", "evaluate", "data check"]))
    pairs = [
        (o, draw(VALUE))
        for o in draw(
            st.lists(
                st.sampled_from(
                    {"train": TRAIN_OPTIONS, "sweep": SWEEP_OPTIONS, "analyze": ANALYZE_OPTIONS}.get(command, ["--image-size", "--split"])
                ),
                min_size=1,
                max_size=3,
            )
        )
    ]
    if command == "evaluate":
        return ["evaluate", draw(VALUE), "--data", draw(VALUE)]
    options = [f"{o}={v}" if draw(st.booleans()) else f"{o}\n{v}" for o, v in pairs]
    options = [part for o in options for part in o.split("\n", 1)]
    if command == "train":
        return ["train", "--data", "missing-data", "--out", "out", *options]
    if command == "sweep":
        return ["sweep", "--data", "missing-data", "--results", "results", *options]
    if command == "analyze":
        return ["analyze", draw(VALUE | st.just("never-ran")), "--results", "results", *options]
    return ["data", "check", "missing-data", *options]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv)'s exit status and stderr; argparse's refusals exit through SystemExit, as in a shell."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@fuzz(100)
@given(argv=command_line())
@example(argv=["train", "--data", "missing-data", "--out", "out", "--weight-decay", "inf"])  # accepted: every step would diverge
@example(argv=["train", "--data", "missing-data", "--out", "out", "--lr", "1e999"])
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "--seed", "9" * 400])
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "--cpus-per-trial", "nan"])
@example(
    argv=["sweep", "--data", "missing-data", "--results", "results", "--num-samples", "1" + "0" * 400]
)  # OverflowError in math.isfinite
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "--name", "."])
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "--space", ""])
@example(argv=["analyze", "\r", "--results", "results"])  # the name's line break split the message in two
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "a\nb"])  # argparse's "unrecognized arguments" too
@example(argv=["analyze", ".", "--results", "results"])
@example(argv=["analyze", "..", "--results", "results"])
@example(argv=["evaluate", "", "--data", ""])
@example(argv=["train", "--data", "missing-data", "--out", "out", "--out=0/x"])  # left 0/ behind: only 0/x was removed
@example(argv=["data", "check", "missing-data", "--image-size", "9" * 400])
@example(argv=["train", "--data", "missing-data", "--out", "out", "--out", "1" + "0" * 400])  # OSError: File name too long
@example(argv=["sweep", "--data", "missing-data", "--results", "results", "--space", "1" + "0" * 400])
def test_fuzzed_command_line_values_are_refused_in_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, argv):
    """Every command here is refused (its data, sweep or weights do not exist): exit 2, one line, no file made."""
    cwd = tmp_path / "cwd"
    (cwd / "results").mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    before = listing(cwd, cache_root())
    status, err = run_cli(argv, capsys)
    assert status == 2, (argv, err)
    assert re.match(r"asl-tune( [a-z]+)*: error: ", one_line(err)), err
    assert listing(cwd, cache_root()) == before, argv


# ---------------------------------------------------------------- image files


def jpeg_bytes(size: int = 32) -> bytes:
    """A small real JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def png_declaring(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG whose header declares width x height grey pixels, whatever its data holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) declares width x height over a 32 px image's data."""
    data = jpeg_bytes()
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4 :]


FILE_CONTENT = st.one_of(
    st.binary(max_size=2000),
    st.just(b""),
    st.builds(png_declaring, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(jpeg_declaring, st.integers(0, 65535), st.integers(0, 65535)),
    st.integers(1, 2000).map(lambda n: jpeg_bytes()[:n]),  # truncated
    st.binary(max_size=200).map(lambda tail: jpeg_bytes()[:200] + tail),  # a real header, then garbage
    st.text(max_size=100).map(str.encode),
)
SUFFIX = st.sampled_from([".jpg", ".JPG", ".jpeg", ".png", ".webp", ".bmp", ".txt", ""])
STEM = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and len(s.encode()) < 200
)


def is_image_name(name: str) -> bool:
    """What the loader lists as an image: a visible file with an image suffix."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def check_cache_whole() -> None:
    """Every decoded entry in the cache is finished (meta.json and images.npy), and no temporary is left."""
    decoded = cache_root() / "decoded"
    for entry in decoded.iterdir() if decoded.is_dir() else []:
        assert not entry.name.startswith("."), entry
        assert sorted(p.name for p in entry.iterdir()) == ["images.npy", "meta.json"], entry


@fuzz(60)
@given(files=st.lists(st.tuples(st.sampled_from(["A", "B"]), STEM, SUFFIX, FILE_CONTENT), min_size=1, max_size=3), replace=st.booleans())
@example(files=[("A", "A1", ".jpg", png_declaring(10_000, 10_000))], replace=True)  # over PIL's limit: refused, not decoded
@example(
    files=[("A", "strip", ".png", png_declaring(1, 8_000_000, b"\0\x80" * 8_000_000))], replace=False
)  # was resized to 32 x 256,000,000
@example(files=[("B", "B2", ".jpg", b"")], replace=True)
def test_fuzzed_image_files_are_decoded_skipped_by_name_or_refused(tmp_path_factory, files, replace):
    """Each bad file is decoded, or skipped with a one-line reason naming it; a class left empty is refused in one line."""
    root = make_dataset(tmp_path_factory.mktemp("images"), per_class=2, classes=["A", "B"], size=32)
    base = root / "asl_alphabet_train" / "asl_alphabet_train"
    for cls, stem, suffix, content in files:
        path = base / cls / (f"{cls}{len(stem) % 2 + 1}.jpg" if replace else stem + suffix)
        path.write_bytes(content)
    expected = sum(is_image_name(p.name) for c in ("A", "B") for p in (base / c).iterdir() if p.is_file())
    try:
        ds = load_dataset(root, 32, progress=False, workers=1)
    except AslTuneError as e:
        assert one_line(str(e)).startswith("--data: class folder(s) with no readable image"), str(e)
    else:
        assert len(ds.labels) + len(ds.skipped) == expected and ds.images.shape == (len(ds.labels), 32, 32, 3)
        for path, why in ds.skipped:
            assert (base / path).is_file() and one_line(why)
    check_cache_whole()
    shutil.rmtree(root)
