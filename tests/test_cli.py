"""The command line: one-trial runs, their JSON and Parquet, and bad input refused with one line and exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import class_image, make_dataset
from sweeps import write_space

from asl_tune.cli import main
from asl_tune.data import load_external
from asl_tune.errors import AslTuneError
from asl_tune.train import load_trained

TINY = ["--image-size", "32", "--head-width", "32", "--batch-size", "16", "--epochs", "2", "--threads", "1"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_train_json_is_the_last_stdout_line(tiny_dataset, capsys):
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "status",
        "val_accuracy",
        "test_accuracy",
        "train_img_per_s",
        "infer_img_per_s",
        "latency_ms_p50",
        "latency_ms_p95",
        "n_parameters",
    ):
        assert key in final, key
    assert final["status"] == "completed"
    assert 0 <= final["val_accuracy"] <= 1 and 0 <= final["test_accuracy"] <= 1
    assert final["n_parameters"] > 0 and final["infer_img_per_s"] > 0


def test_train_out_writes_the_sweep_format(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--out", str(tmp_path / "one")]) == 0
    trials = pd.read_parquet(tmp_path / "one" / "trials.parquet")
    epochs = pd.read_parquet(tmp_path / "one" / "epochs.parquet")
    confusion = pd.read_parquet(tmp_path / "one" / "confusion.parquet")
    assert len(trials) == 1 and trials["status"].iloc[0] == "completed"
    assert (
        trials["params_head_width"].iloc[0] == 32 and trials["params_epochs"].iloc[0] == 2 and trials["params_split"].iloc[0] == "blocked"
    )
    assert list(epochs["epoch"]) == [1, 2] and (epochs["trial_id"] == trials["trial_id"].iloc[0]).all()
    assert set(confusion["true_label"]) <= {"A", "B", "C", "del", "nothing"} and confusion["count"].sum() == 10
    assert "confusions" in capsys.readouterr().out or math.isclose(trials["test_accuracy"].iloc[0], 1.0)
    # The weights: one folder per trial, holding the final checkpoint only, named in the trial's row.
    weights = Path(trials["checkpoint"].iloc[0])
    assert weights == (tmp_path / "one" / trials["trial_id"].iloc[0]).resolve()
    assert [p.name for p in weights.iterdir()] == ["checkpoint.pt"]
    net = load_trained(weights)
    assert net.config.head_width == 32 and net.classes == ["A", "B", "C", "del", "nothing"]
    images = np.stack([np.asarray(class_image(label, 1, 32)) for label in range(5)])
    assert set(net.classify(images)) <= set(net.classes) and len(net.classify(images)) == 5
    with pytest.raises(AslTuneError, match=r"images: must be a \(N, 32, 32, 3\) uint8"):
        net.classify(images[:, :16])
    # A second run into the same folder adds a trial and its own weights; the first stays loadable.
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--out", str(tmp_path / "one")]) == 0
    both = pd.read_parquet(tmp_path / "one" / "trials.parquet")
    assert len(both) == 2 and both["checkpoint"].is_unique and all(Path(c).is_dir() for c in both["checkpoint"])


def test_evaluate_scores_trained_weights_on_another_set_of_images(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--out", str(tmp_path / "one")]) == 0
    weights = pd.read_parquet(tmp_path / "one" / "trials.parquet")["checkpoint"].iloc[0]
    other = make_dataset(tmp_path / "other", per_class=4, seed=7)  # other "hands": a different noise seed
    capsys.readouterr()
    assert main(["evaluate", weights, "--data", str(other), "--json"]) == 0
    judged = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    net = load_trained(weights)
    decoded = load_external(other, net.classes, 32, progress=False)
    expected = np.mean([p == net.classes[label] for p, label in zip(net.classify(decoded.images), decoded.labels)])
    assert judged["images"] == 20 and judged["accuracy"] == pytest.approx(expected)
    assert [r["class_name"] for r in judged["per_class"]] == net.classes and sum(r["support"] for r in judged["per_class"]) == 20
    # The Kaggle test layout: one flat folder of <class>_test.jpg.
    flat = tmp_path / "kaggle_test"
    flat.mkdir()
    for label, name in enumerate(["A", "B", "C", "del", "nothing"]):
        class_image(label, 1, 48, seed=3).save(flat / f"{name}_test.jpg")
    assert main(["evaluate", weights, "--data", str(flat)]) == 0
    out = capsys.readouterr().out
    assert "on 5 images (5 classes; chance 0.2000)" in out and "worst recall" in out


def test_evaluate_refusals_name_the_argument(tiny_dataset, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none"), "--data", str(tiny_dataset)]) == 2
    assert one_error_line(capsys).startswith("asl-tune: error: WEIGHTS: ")
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--out", str(tmp_path / "one")]) == 0
    weights = pd.read_parquet(tmp_path / "one" / "trials.parquet")["checkpoint"].iloc[0]
    capsys.readouterr()
    strange = make_dataset(tmp_path / "strange", per_class=3, classes=["A", "Z"])
    assert main(["evaluate", weights, "--data", str(strange)]) == 2
    assert "--data: class folder(s) not among the training classes: Z" in one_error_line(capsys)


def test_train_refuses_an_out_folder_it_cannot_write_before_training(tiny_dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["train", "--data", str(tiny_dataset), *TINY, "--out", str(tmp_path / "file" / "out")]) == 2
    assert one_error_line(capsys).startswith("asl-tune: error: --out: cannot write to")  # before any decoding or training


def test_load_trained_names_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(AslTuneError, match="nowhere: not a readable checkpoint"):
        load_trained(tmp_path / "nowhere")
    torch.save({"model": {}}, tmp_path / "old.pt")
    with pytest.raises(AslTuneError, match="does not record its settings and classes"):
        load_trained(tmp_path / "old.pt")


@pytest.mark.parametrize(
    "option, value, rule",
    [
        ("--lr", "0", "must be > 0"),
        ("--lr", "nan", "must be > 0"),
        ("--data-fraction", "1.5", "must be in (0, 1]"),
        ("--data-fraction", "0", "must be in (0, 1]"),
        ("--epochs", "0", "must be >= 1"),
        ("--head-width", "1", "must be >= 2"),
        ("--image-size", "16", "must be >= 32"),
        ("--batch-size", "0", "must be >= 1"),
        ("--momentum", "1", "must be in [0, 1)"),
        ("--dropout", "1", "must be in [0, 1)"),
        ("--weight-decay", "-0.1", "must be >= 0"),
        ("--threads", "0", "must be >= 1"),
    ],
)
def test_train_refuses_out_of_range_options(tiny_dataset, tmp_path, capsys, option, value, rule):
    assert main(["train", "--data", str(tiny_dataset), option, value, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"asl-tune: error: {option}: {rule}") and value in line
    assert not (tmp_path / "out").exists()


def test_usage_errors_are_one_line_without_traceback(tmp_path):
    for args in (["train", "--epochs", "three"], ["train", "--split", "diagonal"], ["sweep", "--bogus"], ["frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "asl_tune", *args], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_dataset_refusals_name_the_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "--data" in (line := one_error_line(capsys)) and "missing" in line
    assert not (tmp_path / "out").exists()  # nothing made for a refused run
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"not a jpeg")
    assert main(["data", "check", str(tmp_path / "flat")]) == 2
    assert "flat" in one_error_line(capsys)


def test_data_check_lists_counts_splits_and_skipped_files(tiny_dataset, capsys):
    (tiny_dataset / "asl_alphabet_train" / "asl_alphabet_train" / "A" / "A99.jpg").write_bytes(b"\xff\xd8\xff truncated")
    assert main(["data", "check", str(tiny_dataset), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "classes: 5, images: 60, skipped: 1" in out
    assert "split (blocked, seed 0): train 40, val 10, test 10" in out
    assert "skipped A/A99.jpg" in out
    assert "decoded size: 737 kB at 64 px, 7 MB at 200 px" in out  # 60 images x 64 x 64 x 3, and x 200 x 200 x 3 bytes


def test_data_check_gives_the_decoded_size_at_a_spaces_image_sizes_and_refuses_a_bad_space_before_decoding(tiny_dataset, tmp_path, capsys):
    from sweeps import write_space

    space = write_space(tmp_path / "s.yaml", 2, {"image_size": {"type": "categorical", "choices": [96, 128]}})
    space.write_text(space.read_text().replace("  image_size: 32\n", "", 1))  # searched, so not fixed
    assert main(["data", "check", str(tiny_dataset), "--image-size", "32", "--space", str(space)]) == 0
    assert "decoded size: 737 kB at 64 px, 2 MB at 96 px, 3 MB at 128 px, 7 MB at 200 px" in capsys.readouterr().out
    assert main(["data", "check", str(tiny_dataset), "--image-size", "48", "--space", "no-such-space"]) == 2
    assert "--space: no file 'no-such-space'" in one_error_line(capsys)
    assert not list((Path(os.environ["ASL_TUNE_CACHE"]) / "decoded").glob("*-48px"))  # refused before decoding


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num-samples", "0"], "--num-samples: must be > 0, got 0"),
        (["--cpus-per-trial", "0"], "--cpus-per-trial: must be > 0, got 0"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial: must be >= 0, got -1"),
        (["--max-concurrent", "0"], "--max-concurrent: must be > 0, got 0"),
        (["--address", "127.0.0.1:notaport"], "--address: must be host:port"),
        (["--space", "no-such-space"], "--space: no file 'no-such-space'"),
        (["--extend", "--name", "never-ran"], "--extend: there is no sweep named 'never-ran'"),
        (
            ["--no-ship-code"],
            "--no-ship-code: applies with --address only (a local Ray runs this machine's asl_tune), got it without --address",
        ),
        (["--storage", "/not/a/uri"], "--storage: must be a URI"),
        (
            ["--results", "foo://x"],
            "--results: must be a folder or a URI pyarrow's filesystems open (s3://bucket/path, gs://bucket/path, file:///path), got foo://x",
        ),
        (["--results", "file://host/x"], "--results: must be a folder or a URI pyarrow's filesystems open"),
    ],
)
def test_sweep_refuses_bad_options_before_creating_anything(tiny_dataset, tmp_path, capsys, extra, needle):
    results = tmp_path / "results"
    assert main(["sweep", "--data", str(tiny_dataset), "--results", str(results), *extra]) == 2
    assert needle in one_error_line(capsys)
    assert not results.exists()
    assert not (Path(os.environ["ASL_TUNE_CACHE"]) / "sweeps").exists()  # no working copy for a URI either


@pytest.mark.parametrize("command", [["resume", "x"], ["analyze", "x"]])
def test_resume_and_analyze_refuse_a_uri_pyarrow_cannot_open(command, capsys):
    assert main([*command, "--results", "foo://x"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("asl-tune: error: --results: must be a folder or a URI") and "foo://x" in line
    assert not (Path(os.environ["ASL_TUNE_CACHE"]) / "sweeps").exists()


def test_sweep_refuses_a_bad_space_file_before_creating_anything(tiny_dataset, tmp_path, capsys):
    space = write_space(tmp_path / "bad.yaml", 2, params={"lr": {"type": "float", "low": 0.1, "high": 0.01}})
    assert main(["sweep", "--space", str(space), "--data", str(tiny_dataset), "--results", str(tmp_path / "results")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("asl-tune: error: bad.yaml: params.lr") and "low" in line
    assert not (tmp_path / "results").exists()


def test_sweep_refuses_results_that_cannot_be_written(tiny_dataset, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["sweep", "--data", str(tiny_dataset), "--results", str(tmp_path / "a-file" / "results")]) == 2
    assert "--results: cannot write to" in one_error_line(capsys)


def test_an_address_where_no_cluster_answers_fails_fast(tiny_dataset, tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "asl_tune",
            "sweep",
            "--data",
            str(tiny_dataset),
            "--results",
            str(tmp_path / "results"),
            "--address",
            "127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "--address: no Ray cluster answers at 127.0.0.1:9" in lines[-1] and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "results").exists()


def test_every_command_explains_itself():
    for args in (
        ["--help"],
        ["train", "--help"],
        ["sweep", "--help"],
        ["resume", "--help"],
        ["analyze", "--help"],
        ["evaluate", "--help"],
        ["data", "check", "--help"],
        ["data", "synth", "--help"],
    ):
        proc = subprocess.run([sys.executable, "-m", "asl_tune", *args], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: asl-tune" in proc.stdout, args


def test_analyze_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    from asl_tune.results import ResultsStore, trial_row

    store = ResultsStore(tmp_path / "busy")
    store.put_trial(trial_row("t1", "running", {"lr": 0.01}, {}))
    store.flush()
    cases = [
        (["analyze", "nope", "--results", str(tmp_path)], "nope: no such sweep folder"),
        (["analyze", "busy", "--results", str(tmp_path)], "no finished trials"),
        (["analyze", "busy", "--results", str(tmp_path), "--objectives", "val_accuracy:max,speed:max"], "--objectives"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        assert needle in one_error_line(capsys), args
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["trials.parquet"]  # no report/ left behind
    assert not (tmp_path / "nope").exists()


def test_train_refuses_a_bad_device_choice_before_decoding_or_creating_anything(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASL_TUNE_DEVICE", "tpu")
    assert main(["train", "--data", str(tiny_dataset), "--image-size", "32", "--out", str(tmp_path / "out")]) == 2
    assert "ASL_TUNE_DEVICE: must be cpu or cuda" in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not list(Path(os.environ["ASL_TUNE_CACHE"]).glob("decoded/*"))
