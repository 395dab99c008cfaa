"""Joining a Ray cluster with --address from the command line: a real two-node cluster started outside asl-tune
(`ray start --head` and a second node), on loopback, and addresses where no Ray answers (refused, silent, timing out) refused within seconds."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import ray
from conftest import make_dataset
from sweeps import assert_consistent, cli, read, run_cli, run_to_end, wait_for, write_space

from asl_tune.errors import AslTuneError
from asl_tune.sweep.cluster import (
    CONNECT_TIMEOUT_S,
    JOIN_ENV,
    LOCAL_ENV,
    PENDING_KEY,
    SAVE_PERIOD_KEY,
    ray_session,
    scoped_environment,
    tune_environment,
)

pytestmark = pytest.mark.timeout(600)
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's `ray` command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A second node joining the head, as `ray start --address` would start it. This Ray's `ray start --address`
# refuses a cluster kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and, allowed, rewrites 127.0.0.1 to
# the machine's outward address; ray.cluster_utils.Cluster starts its nodes this same way.
JOIN_NODE = """
import signal, sys
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(node_ip_address="127.0.0.1", gcs_address=sys.argv[1], num_cpus=1, num_gpus=0,
    object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0)
params.dashboard_agent_listen_port = None
ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


@contextmanager
def process_group(command: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """A command in its own process group for the block; every process of the group is gone after it."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM first: Ray's processes clean up their sockets
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)


def alive_nodes(address: str) -> int:
    """Nodes alive in the cluster, asked by a driver of its own (it reads the token from the environment at start)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def test_a_sweep_joins_a_two_node_cluster_started_outside_it_whose_nodes_lack_asl_tune(tmp_path, monkeypatch):
    """`ray start --head` as a subprocess, a second node joining it, then `asl-tune sweep --address` as a subprocess.

    On the nodes, `import asl_tune` fails (a package of that name that refuses to load comes first on their
    PYTHONPATH), as on nodes that have only the dependencies: the driver ships its asl_tune to the workers."""
    data = make_dataset(tmp_path / "data", per_class=30, size=32)
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Token authentication, which Ray 2.60 uses only when given a token (else it warns and lets anyone join): every process gets the same one.
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}.items():
        monkeypatch.setenv(key, value)
    absent = tmp_path / "nodes-site" / "asl_tune"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text("raise ImportError('asl_tune is not installed on this node')\n")
    env = {**os.environ, "PYTHONPATH": str(absent.parent)}  # the nodes' (and so their workers') environment; not the driver's
    no_import = subprocess.run([sys.executable, "-c", "import asl_tune"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert no_import.returncode != 0 and "not installed on this node" in no_import.stderr  # the premise
    space = write_space(
        tmp_path / "joined.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 2},
        early_stopping=False,
    )
    head_command = [
        RAY,
        "start",
        "--block",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    with process_group(head_command, env) as head:
        wait_for(lambda: _answers(address), 120, head, "the head node to listen")
        with process_group([sys.executable, "-c", JOIN_NODE, address], env) as node:
            wait_for(lambda: alive_nodes(address) == 2, 120, node, "the second node to join")
            out = run_cli(
                ["sweep", "--space", str(space), "--data", str(data), "--results", str(tmp_path / "results"), "--address", address],
                tmp_path,
                400,
            )
    trials, _ = assert_consistent(tmp_path / "results" / "joined", 2)
    assert set(trials["status"]) == {"completed"}, out[-3000:]
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id"]]
    assert "sweep 'joined' done" in out


def test_a_joined_clusters_workers_get_the_drivers_asl_tune_and_its_device_choice(monkeypatch):
    import asl_tune
    from asl_tune.sweep.cluster import job_runtime_env
    from asl_tune.train import DEVICE_ENV

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    env = job_runtime_env(ship_code=True)
    assert env["py_modules"] == [str(Path(asl_tune.__file__).resolve().parent)] and env["env_vars"] == {DEVICE_ENV: "cpu"}
    assert job_runtime_env(ship_code=False) == {"env_vars": {DEVICE_ENV: "cpu"}}
    monkeypatch.delenv(DEVICE_ENV)
    assert job_runtime_env(ship_code=False) is None


def _answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def refuse(address: str, tmp_path: Path) -> tuple[list[str], float]:
    """Run `asl-tune sweep --address ADDRESS`; return its stderr lines and how long it took to be refused."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "asl_tune", "sweep", "--results", str(tmp_path / "results"), "--address", address],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()
    return proc.stderr.strip().splitlines(), elapsed


# Python's start-up and imports come on top of the 5 s the address is given; Ray's own join waits 60 s.
DEADLINE_S = CONNECT_TIMEOUT_S + 15


def test_a_port_that_accepts_and_says_nothing_is_refused_within_the_connect_timeout(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens; the kernel accepts; nobody ever answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        lines, elapsed = refuse(address, tmp_path)
    assert lines == [
        f"asl-tune: error: --address: no Ray cluster answers at {address} (it accepted the connection but never answered; gave up after at most 5 s); start one with `ray start --head` or `ray up CLUSTER.yaml`"
    ], lines
    assert elapsed < DEADLINE_S


def test_a_connection_that_times_out_is_refused_within_the_connect_timeout(tmp_path):
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # an accept queue of one, filled below, so the next connection's SYN goes unanswered
        address = f"127.0.0.1:{full.getsockname()[1]}"
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
        time.sleep(0.2)
        try:
            lines, elapsed = refuse(address, tmp_path)
        finally:
            for s in fillers:
                s.close()
    assert "no Ray cluster answers" in lines[-1] and "timed out connecting" in lines[-1], lines
    assert elapsed < DEADLINE_S


def test_a_closed_port_is_refused_at_once(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    lines, elapsed = refuse(address, tmp_path)
    assert f"--address: no Ray cluster answers at {address} (Connection refused" in lines[-1], lines
    assert elapsed < DEADLINE_S


# ---------------------------------------------------------------- what a session leaves behind in this process


def _environ_without_session_settings(monkeypatch) -> dict[str, str]:
    """os.environ with none of the settings a Ray session sets, but the loopback one that conftest sets for every test."""
    for key in {**LOCAL_ENV, **JOIN_ENV}:
        if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
            monkeypatch.delenv(key, raising=False)
    return dict(os.environ)


def _as_before(before: dict[str, str]) -> bool:
    """Every variable set before is as it was, and none of ours is left; Ray may add its own (kept: see scoped_environment)."""
    ours = set(LOCAL_ENV) | set(JOIN_ENV)
    return {k: os.environ.get(k) for k in before} == before and not [k for k in ours - set(before) if k in os.environ]


def test_a_ray_session_sets_rays_settings_for_its_block_only_even_when_the_block_raises(monkeypatch):
    before = _environ_without_session_settings(monkeypatch)
    with pytest.raises(RuntimeError, match="the sweep failed"):
        with ray_session(num_cpus=1):
            assert ray.is_initialized()
            assert {key: os.environ.get(key) for key in LOCAL_ENV} == LOCAL_ENV  # Ray read them as it started
            raise RuntimeError("the sweep failed")
    assert not ray.is_initialized()
    assert _as_before(before)


def test_tune_saves_its_state_every_second_up_to_500_trials_then_a_second_more_per_500_and_a_users_period_wins(monkeypatch):
    """Tune's save writes every trial of the run: at 10,000 trials a save every second took most of the driver."""
    assert [tune_environment(n, 2)[SAVE_PERIOD_KEY] for n in (1, 100, 500, 1000, 1250, 10_000)] == ["1", "1", "1", "2", "2.5", "20"]
    monkeypatch.setenv(SAVE_PERIOD_KEY, "auto")  # Ray's own rule, set by the user: kept
    with scoped_environment(tune_environment(10_000, 2)):
        assert os.environ[SAVE_PERIOD_KEY] == "auto"
    monkeypatch.delenv(SAVE_PERIOD_KEY)
    with scoped_environment(tune_environment(10_000, 2)):
        assert os.environ[SAVE_PERIOD_KEY] == "20"
    assert SAVE_PERIOD_KEY not in os.environ


def test_a_join_that_is_refused_leaves_the_environment_as_it_was(monkeypatch):
    before = _environ_without_session_settings(monkeypatch)
    with pytest.raises(AslTuneError, match="no Ray cluster answers"):
        with ray_session(f"127.0.0.1:{free_port()}"):
            pass
    assert _as_before(before)


def test_a_node_lost_mid_sweep_moves_its_trials_to_the_survivor_from_their_checkpoints(tmp_path, monkeypatch):
    """A two-node loopback cluster (ray.cluster_utils.Cluster, 1 CPU each); the second node is removed while a trial
    runs on it. The sweep ends with exactly the trials asked for; the moved trial continues from its last
    checkpoint on the head node (its earlier epochs are not trained again) and its row says where it ended."""
    from ray.cluster_utils import Cluster

    data = make_dataset(tmp_path / "data", per_class=30, size=32)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's auth settings as this process's Ray already read them
    space = write_space(
        tmp_path / "lost.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 6},
        early_stopping=False,
    )
    folder = tmp_path / "results" / "lost"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "gcs_server_port": free_port(), "include_dashboard": False, "num_cpus": 1},
    )
    try:
        head, second = cluster.head_node.node_id, cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1)
        command = [
            "sweep",
            "--space",
            str(space),
            "--data",
            str(data),
            "--results",
            str(tmp_path / "results"),
            "--address",
            cluster.address,
        ]
        with cli(command, cwd=tmp_path) as driver:
            wait_for(lambda: len(epochs_on(folder, second.node_id)) > 0, 300, driver, "a trial's second epoch on the second node")
            moved = epochs_on(folder, second.node_id)["trial_id"].iloc[0]
            before = read(folder, "epochs").query("trial_id == @moved").set_index("epoch")
            cluster.remove_node(second, allow_graceful=False)
            out = run_to_end(driver, 400)
    finally:
        cluster.shutdown()
    trials, epochs = assert_consistent(folder, 2)
    assert set(trials["status"]) == {"completed"}, out[-3000:]
    mine = epochs[epochs.trial_id == moved].set_index("epoch")
    assert list(mine.index) == list(range(1, 7))
    kept = [e for e in before.index if e in mine.index and mine.loc[e, "seconds"] == before.loc[e, "seconds"]]
    assert kept and kept == list(range(1, len(kept) + 1)), (before["seconds"], mine["seconds"])  # not restarted from epoch 1
    assert trials.set_index("trial_id").loc[moved, "node_id"] == head  # where it ended


def epochs_on(folder: Path, node_id: str):
    """Epoch rows, from the second on, of trials whose row says they run on node_id (none before the rows say where)."""
    trials, epochs = read(folder, "trials"), read(folder, "epochs")
    if "node_id" not in trials or epochs.empty:
        return epochs.iloc[0:0]
    here = set(trials.loc[trials["node_id"] == node_id, "trial_id"])
    return epochs[epochs["trial_id"].isin(here) & (epochs["epoch"] >= 2)]


def test_tune_keeps_as_many_trials_pending_as_run_at_once_and_a_users_setting_wins(monkeypatch):
    """Without it Tune keeps 1 pending for asl-tune's searcher: with reused workers, 1-s trials ran one at a time on 2 CPUs."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    search = SearchGenerator(
        OptunaSearch(space={}, metric="m", mode="max")
    )  # no ConcurrencyLimiter, as asl-tune's without --max-concurrent
    monkeypatch.delenv(PENDING_KEY, raising=False)
    assert _get_max_pending_trials(search) == 1  # Tune's own rule, which the setting replaces
    with scoped_environment(tune_environment(100, 6)):
        assert _get_max_pending_trials(search) == 6
    assert tune_environment(100, 0)[PENDING_KEY] == "1"  # a plan that places nothing yet still lets one trial wait
    monkeypatch.setenv(PENDING_KEY, "3")
    with scoped_environment(tune_environment(100, 6)):
        assert _get_max_pending_trials(search) == 3


@pytest.mark.slow
def test_a_sweep_that_loses_its_ray_head_ends_in_one_line_with_the_resume_command_and_resumes_on_a_new_head(tmp_path, monkeypatch):
    """The head of a ray.cluster_utils.Cluster is killed while both trials hold after their first epoch (FAULT_ENV on the
    cluster's workers). Ray's own driver would end the process 60 s later with one C++ line; asl-tune's ends the sweep
    after ASL_TUNE_LOST_HEAD_S with exit 4, one line, the resume command and no traceback. `resume --address` on a
    new cluster then finishes both trials."""
    from ray.cluster_utils import Cluster

    from asl_tune.errors import RAY_FAILED
    from asl_tune.sweep.cluster import LOST_HEAD_ENV
    from asl_tune.sweep.trainable import FAULT_ENV

    data = make_dataset(tmp_path / "data", per_class=30, size=32)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv(LOST_HEAD_ENV, "6")
    space = write_space(
        tmp_path / "headless.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 2},
        early_stopping=False,
    )
    results, folder = tmp_path / "results", tmp_path / "results" / "headless"

    def new_cluster():
        return Cluster(
            initialize_head=True,
            head_node_args={"node_ip_address": "127.0.0.1", "gcs_server_port": free_port(), "include_dashboard": False, "num_cpus": 2},
        )

    monkeypatch.setenv(FAULT_ENV, "hold@1")  # read by the trials, which this cluster's workers run
    first = new_cluster()
    try:
        command = ["sweep", "--space", str(space), "--data", str(data), "--results", str(results), "--address", first.address]
        with cli(command, cwd=tmp_path) as driver:
            wait_for(lambda: len(read(folder, "epochs")) == 2, 300, driver, "both trials' first epoch")
            first.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
            out, _ = driver.communicate(timeout=300)
    finally:
        first.shutdown()
    errors = [line for line in out.splitlines() if line.startswith("asl-tune: error:")]
    assert driver.returncode == RAY_FAILED, out[-3000:]
    assert len(errors) == 1 and f"`asl-tune resume headless --results {results}`" in errors[0], out[-3000:]
    assert "lost its Ray cluster: the head at 127.0.0.1:" in errors[0] and "has not answered for 6 s" in errors[0]
    assert "Traceback" not in out and "Failed to connect to GCS" not in out, out[-3000:]

    monkeypatch.delenv(FAULT_ENV)
    second = new_cluster()
    try:
        out = run_cli(["resume", "headless", "--results", str(results), "--address", second.address], tmp_path, 400)
    finally:
        second.shutdown()
    trials, epochs = assert_consistent(folder, 2)
    assert set(trials["status"]) == {"completed"}, out[-3000:]
    assert sorted(epochs.groupby("trial_id")["epoch"].max()) == [2, 2]


def test_the_lost_head_wait_is_30_s_or_the_users_below_rays_own_60(monkeypatch):
    from asl_tune.sweep.cluster import LOST_HEAD_ENV, lost_head_after_s

    monkeypatch.delenv(LOST_HEAD_ENV, raising=False)
    assert lost_head_after_s() == 30.0
    monkeypatch.setenv(LOST_HEAD_ENV, "12.5")
    assert lost_head_after_s() == 12.5
    for bad in ("soon", "0", "60", "-3"):
        monkeypatch.setenv(LOST_HEAD_ENV, bad)
        with pytest.raises(AslTuneError, match=rf"^ASL_TUNE_LOST_HEAD_S: must be seconds above 0 and below 60 .*, got '{bad}'$"):
            lost_head_after_s()
