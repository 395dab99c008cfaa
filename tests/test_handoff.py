"""handoff.py: one copy of the decoded data per node, trials that map it, and the memory plan made before decoding."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_dataset
from sweeps import write_space

from asl_tune.data import decoded_bytes, load_dataset, size_text
from asl_tune.errors import AslTuneError
from asl_tune.sweep.handoff import Node, SharedDataset, plan, share, trial_mb

GB = 1e9


def node(cpus=2.0, memory=24 * GB, store=7 * GB, has_cache=True, gpus=0.0, address="10.0.0.1") -> Node:
    return Node(node_id=address, address=address, cpus=cpus, gpus=gpus, memory_bytes=memory, object_store_bytes=store, has_cache=has_cache)


def test_a_plan_that_fits_gives_the_data_size_at_each_image_size_and_the_trials_at_once(tiny_dataset):
    found = plan(tiny_dataset, None, [32, 64], [node(cpus=4)], cpus_per_trial=1, gpus_per_trial=0, max_concurrent=3, num_samples=10)
    n = 5 * 12
    assert found.per_size == {32: decoded_bytes(n, 32), 64: decoded_bytes(n, 64)}
    assert found.data_bytes == decoded_bytes(n, 32) + decoded_bytes(n, 64)
    assert found.at_once == {"10.0.0.1": 3}  # --max-concurrent bounds the node's 4 CPUs
    assert found.trial_mb == trial_mb(64)
    assert (
        len(found.lines) == 1
        and "fits" in found.lines[0]
        and "3 trials at once" in found.lines[0]
        and "read from the cache file (page cache)" in found.lines[0]
    )


def test_more_trials_at_once_than_a_nodes_memory_holds_are_refused_with_the_figures_and_the_ways_out(tiny_dataset):
    with pytest.raises(
        AslTuneError,
        match=r"memory plan: node 10\.0\.0\.1 would run 40 trials at once.*of its 8\.00 GB; run fewer at once \(--max-concurrent \d+\)",
    ) as e:
        plan(
            tiny_dataset,
            None,
            [200],
            [node(cpus=4, memory=8 * GB)],
            cpus_per_trial=0.1,
            gpus_per_trial=0,
            max_concurrent=None,
            num_samples=100,
        )
    message = str(e.value)
    assert "\n" not in message and "--cpus-per-trial" in message and "smaller image size" in message and "more memory" in message
    fewer = int(message.split("--max-concurrent ")[1].split(")")[0])
    plan(
        tiny_dataset,
        None,
        [200],
        [node(cpus=4, memory=8 * GB)],
        cpus_per_trial=0.1,
        gpus_per_trial=0,
        max_concurrent=fewer,
        num_samples=100,
    )  # the way out it names fits


def test_a_node_without_the_cache_needs_an_object_store_that_holds_the_data_and_counts_it_against_its_memory(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=40)  # 200 images: 24 MB at 200 px
    need = decoded_bytes(200, 200)
    with pytest.raises(
        AslTuneError,
        match=r"node 10\.0\.0\.2 has no cache file and its object store holds 10 MB, less than the 24 MB of data; .*--object-store-memory",
    ):
        plan(
            data,
            None,
            [200],
            [node(), node(has_cache=False, store=10e6, address="10.0.0.2")],
            cpus_per_trial=1,
            gpus_per_trial=0,
            max_concurrent=None,
            num_samples=4,
        )
    found = plan(
        data,
        None,
        [200],
        [node(), node(has_cache=False, store=2 * need, address="10.0.0.2")],
        cpus_per_trial=1,
        gpus_per_trial=0,
        max_concurrent=None,
        num_samples=4,
    )
    assert found.at_once == {"10.0.0.1": 2, "10.0.0.2": 2}
    assert "read from the cache file (page cache) on 1 node and one object-store copy on each of 1 node without the cache" in found.lines[0]


def test_gpus_bound_the_trials_a_node_runs_at_once(tiny_dataset):
    found = plan(
        tiny_dataset, None, [64], [node(cpus=16, gpus=1)], cpus_per_trial=1, gpus_per_trial=0.25, max_concurrent=None, num_samples=10
    )
    assert found.at_once == {"10.0.0.1": 4}


def test_a_cache_disk_too_small_for_the_decoded_data_is_refused(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=2)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(
        AslTuneError, match=r"memory plan: the decoded data needs 1 MB in the cache folder .* which has 1 kB free; set ASL_TUNE_CACHE"
    ):
        plan(data, None, [200], [node()], cpus_per_trial=1, gpus_per_trial=0, max_concurrent=None, num_samples=1)


def test_a_trial_gets_the_cache_file_mapped_read_only_and_what_crosses_ray_does_not_grow_with_the_data(tmp_path):
    small = load_dataset(make_dataset(tmp_path / "small", per_class=4), 32, progress=False)
    large = load_dataset(make_dataset(tmp_path / "large", per_class=40), 32, progress=False)
    pickled = {}
    for name, ds in (("small", small), ("large", large)):
        shared = share({32: ds}, [node()])[32]  # every node has the cache: nothing goes to Ray's object store
        assert shared.ref is None
        pickled[name] = len(pickle.dumps(shared.meta.images)) + len(pickle.dumps(shared.cache_file))
        opened = pickle.loads(pickle.dumps(shared)).open()  # as a trial unpickles it
        assert isinstance(opened.images, np.memmap) and not opened.images.flags.writeable
        assert Path(opened.images.filename) == Path(ds.cache_file).resolve()
        np.testing.assert_array_equal(opened.images, ds.images)
        assert list(opened.labels) == list(ds.labels) and opened.classes == ds.classes
    assert large.images.nbytes == 10 * small.images.nbytes
    assert pickled["large"] == pickled["small"]  # the array itself never travels: only its path


def test_a_node_without_the_cache_file_maps_rays_read_only_copy(tmp_path, capsys):
    import ray

    from asl_tune.sweep import cluster

    ds = load_dataset(make_dataset(tmp_path / "data", per_class=6), 32, progress=False)
    with cluster.ray_session(num_cpus=1):
        shared = share({32: ds}, [node(), node(has_cache=False, address="10.0.0.2")])[32]
        assert shared.ref is not None
        said = capsys.readouterr().err  # the hand-off is never silent
        assert "handing 92 kB (32 px) to Ray's object store for the nodes without the cache" in said and ": done in " in said
        elsewhere = SharedDataset(
            shared.meta, str(tmp_path / "no-such-cache" / "images.npy"), shared.cache_bytes, shared.ref
        )  # as on that node

        @ray.remote(num_cpus=1)
        def open_there(shared: SharedDataset):
            images = shared.open().images
            return images.flags.writeable, images.flags.owndata, int(images.sum()), images.shape

        writeable, owndata, total, shape = ray.get(open_there.remote(elsewhere))
    assert not writeable and not owndata  # a view of the object store, no private copy
    assert (total, shape) == (int(ds.images.sum()), ds.images.shape)


def test_the_hand_offs_progress_line_gives_the_bytes_copied_so_far(tmp_path):
    """ray.put is one call; the copy reads the cache file through the driver's mapping, front to back, so the mapping's
    resident bytes are how far it is (forced here: half the rows read, as a put half done would have)."""
    import re

    from asl_tune.sweep.handoff import put_progress

    ds = load_dataset(make_dataset(tmp_path / "data", per_class=40), 64, progress=False)  # 200 images of 12 kB
    fresh = dataclasses.replace(ds, images=np.load(ds.cache_file, mmap_mode="r"))  # nothing read through it yet
    total = size_text(fresh.images.nbytes)
    assert put_progress(fresh, 3.2) == f"{size_text(0)} of {total} (0%), 3 s so far"
    np.asarray(fresh.images[: len(fresh.images) // 2]).sum()
    line = put_progress(fresh, 7.0)
    assert re.fullmatch(rf"[\d.,]+ [kM]B of {total} \((\d+)%\), 7 s so far", line), line
    assert 45 <= int(re.search(r"\((\d+)%\)", line).group(1)) <= 55, line  # half, to the page
    assert put_progress(dataclasses.replace(ds, cache_file=""), 12.0) == "12 s so far"  # not from a file: the time alone


def test_a_sweep_the_memory_plan_refuses_is_refused_before_decoding_with_nothing_created(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    space = write_space(tmp_path / "s.yaml", 200, {"lr": {"type": "float", "low": 0.01, "high": 0.1}}, fixed={"image_size": 200})
    cache = tmp_path / "cache"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asl_tune",
            "sweep",
            "--space",
            str(space),
            "--data",
            str(data),
            "--results",
            str(tmp_path / "results"),
            "--cpus-per-trial",
            "0.01",
            "--max-concurrent",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ASL_TUNE_CACHE": str(cache)},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("asl-tune: error: memory plan: node 127.0.0.1 would run 200 trials at once") and "--max-concurrent" in last, (
        done.stderr[-3000:]
    )
    assert "Traceback" not in done.stderr
    assert not (cache / "decoded").exists()  # refused before decoding
    assert not (tmp_path / "results" / "s").exists()  # and nothing created


def _hard_linked(root: Path, per_class: int, rendered: Path) -> Path:
    """A dataset of per_class images per class, each a hard link to one of the rendered frames, in frame order (no new JPEG)."""
    base = root / "asl_alphabet_train" / "asl_alphabet_train"
    for folder in sorted((rendered / "asl_alphabet_train" / "asl_alphabet_train").iterdir()):
        frames = sorted(folder.iterdir(), key=lambda p: int(p.stem[len(folder.name) :]))
        (base / folder.name).mkdir(parents=True)
        for i in range(per_class):
            os.link(frames[i * len(frames) // per_class], base / folder.name / f"{folder.name}{i + 1}.jpg")
    return root


@pytest.mark.slow
def test_a_trials_private_memory_does_not_grow_with_the_dataset(tmp_path):
    """Two sweeps with the same trial settings on arrays 10x apart (40 MB and 400 MB at 128 px): a trial that copied
    the array (as an unpickled memmap did) would hold 400 MB more; one that reads it from the cache file holds the same either way."""
    import asl_tune
    from asl_tune.sweep import cluster

    rendered = make_dataset(tmp_path / "rendered", per_class=10, size=128)
    small, large = _hard_linked(tmp_path / "small", 163, rendered), _hard_linked(tmp_path / "large", 1630, rendered)
    space = write_space(
        tmp_path / "mem.yaml",
        1,
        {"lr": {"type": "float", "low": 0.01, "high": 0.02}},
        fixed={"image_size": 128, "epochs": 1, "data_fraction": 0.01, "batch_size": 16},
    )
    private, array_mb = {}, {}
    with cluster.ray_session(num_cpus=1):  # one Ray for both sweeps
        for name, data in (("small", small), ("large", large)):
            asl_tune.sweep(space=space, data=data, results=tmp_path / "results", name=name)
            trials = asl_tune.load(name, tmp_path / "results").trials
            assert list(trials["status"]) == ["completed"]
            private[name] = float(trials["peak_private_mb"].iloc[0])
            array_mb[name] = load_dataset(data, 128, progress=False).images.nbytes / 1e6
    assert array_mb["large"] >= 10 * array_mb["small"] * 0.99 and array_mb["large"] > 390
    assert abs(private["large"] - private["small"]) <= 0.2 * private["small"], (private, array_mb)


@pytest.mark.slow
def test_trials_killed_by_rays_memory_monitor_end_in_one_line_with_the_resume_command_and_resume_runs_them_again(tmp_path):
    """A real kill by Ray's memory monitor (its threshold set below what the machine already uses), then a resume without it."""
    from asl_tune.results import read_trials

    data = make_dataset(tmp_path / "data", per_class=8)
    space = write_space(tmp_path / "oom.yaml", 2, {"lr": {"type": "float", "low": 0.01, "high": 0.1}}, fixed={"epochs": 1})
    base = [sys.executable, "-m", "asl_tune"]
    env = {**os.environ, "RAY_memory_usage_threshold": "0.01", "RAY_memory_monitor_refresh_ms": "100"}
    killed = subprocess.run(
        [*base, "sweep", "--space", str(space), "--data", str(data), "--results", "results"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert killed.returncode == 3, killed.stderr[-3000:]  # errors.TrialsErrored
    assert "Traceback" not in killed.stderr and "Top 10 memory users" not in killed.stderr, killed.stderr[-3000:]
    last = killed.stderr.strip().splitlines()[-1]
    assert last.startswith("asl-tune: error: sweep 'oom' ended with 2 of 2 trials errored") and "killed by Ray's memory monitor" in last, (
        last
    )
    assert last.endswith("`asl-tune resume oom` runs them again from their last checkpoints"), last
    assert set(read_trials(tmp_path / "results" / "oom")["status"]) == {"errored"}
    for log in (tmp_path / "results" / "oom" / "logs").glob("*.log"):
        assert "running low on memory" in log.read_text()  # the whole story is in the trial's log

    resumed = subprocess.run([*base, "resume", "oom"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = read_trials(tmp_path / "results" / "oom")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}, trials[["trial_id", "status"]]
