"""A real three-host Ray cluster, made on this machine from Linux namespaces (netns.py): each host has its own
address on 198.18.0.0/24 (through a bridge), its own mount, PID and UTS namespaces and a private /tmp, and
sees one shared folder at /tmp/nfs. `ray start --head` runs on h1 with token authentication, `ray start
--address` on h2 and h3, and every driver runs inside h1, as `asl-tune sweep --address 198.18.0.1:6379`.

One cluster for the module; the last test takes two hosts down (one killed, one cut off). Needs root with
CAP_NET_ADMIN (CI has both); elsewhere the module is skipped and says why.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
from conftest import make_dataset
from sweeps import assert_consistent, read, wait_for, write_space

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
if (why := netns.why_unavailable()) is not None:
    pytestmark.append(pytest.mark.skip(reason=f"namespace hosts unavailable: {why}"))

RAY = str(Path(sys.executable).with_name("ray"))
ADDRESS = f"{netns.SUBNET}.1:6379"
# Ray's health check of its nodes, shortened (its documented RAY_health_check_* settings, read by the head's GCS):
# a host cut off is declared dead after about 3 s instead of Ray's 64 s of defaults.
HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
PARAMS = {"head_width": {"type": "categorical", "choices": [16, 24, 32]}}
# On h2 and h3 only (their Ray nodes' environment, which their workers inherit), a trial of head width 40 waits after
# its first epoch until its host goes down: the lost-host test's trials are there, checkpointed, when it strikes.
HOLD_ON_WORKERS = {"ASL_TUNE_FAULT": "hold@1:head_width=40"}
LOST_PARAMS = {"head_width": {"type": "categorical", "choices": [40]}}


@dataclass
class Cluster:
    hosts: list[netns.Host]
    root: Path  # the root namespace's view: root/nfs is the shared folder, root/hN-tmp host N's /tmp
    token: dict  # what a driver needs to be let in

    def driver(self, args: list[str], token: bool = True, env: dict | None = None) -> subprocess.Popen:
        """`asl-tune ARGS` inside h1, with the cluster's token unless token=False; its stdout and stderr go to files
        (finish reads them), so a test that polls the results meanwhile never blocks it on a full pipe."""
        env = {"ASL_TUNE_CACHE": "/tmp/cache", **(self.token if token else {}), **(env or {})}
        n = len(list(self.root.glob("driver-*.err")))
        with open(self.root / f"driver-{n}.out", "w") as out, open(self.root / f"driver-{n}.err", "w") as err:
            proc = self.hosts[0].run([sys.executable, "-m", "asl_tune", *args], env=env, stdout=out, stderr=err)
        proc.files = (self.root / f"driver-{n}.out", self.root / f"driver-{n}.err")
        return proc

    def ids(self) -> dict[str, str]:
        """Ray's node id of each host, by hostname, asked by a driver inside h1."""
        ask = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps({n['NodeManagerHostname']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"
            % ADDRESS
        )
        out, _ = (
            self.hosts[0]
            .run([sys.executable, "-c", ask], env=self.token, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            .communicate(timeout=120)
        )
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    base = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV") if k in os.environ}
    # Not RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a local Ray on 127.0.0.1: with it, `ray start --address` refuses to join.
    with netns.hosts(root, 3, base) as hosts:
        make_dataset(hosts[0].tmp / "data", per_class=20, size=32)  # /tmp/data in h1 only: the driver decodes it
        common = ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats"]
        logs = root / "ray-logs"
        logs.mkdir()
        hosts[0].run(
            [RAY, "start", "--head", f"--node-ip-address={hosts[0].ip}", "--port=6379", "--include-dashboard=false", *common],
            env={**token, **HEALTH_CHECK},
            stdout=open(logs / "h1.log", "w"),
            stderr=subprocess.STDOUT,
        )
        c = Cluster(hosts, root, token)
        wait_for(lambda: "Ray runtime started" in (logs / "h1.log").read_text(), 180, what="the head node on h1")
        for host in hosts[1:]:
            host.run(
                [RAY, "start", f"--address={ADDRESS}", f"--node-ip-address={host.ip}", *common],
                env={**token, **HOLD_ON_WORKERS},
                stdout=open(logs / f"{host.name}.log", "w"),
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: len(c.ids()) == 3, 180, what="h2 and h3 to join")
        yield c


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a driver; its exit status, stdout and stderr."""
    proc.wait(timeout=timeout)
    return proc.returncode, proc.files[0].read_text(), proc.files[1].read_text()


def running(proc: subprocess.Popen) -> bool:
    """True while a driver runs; fails with its stderr once it has exited."""
    if proc.poll() is not None:
        raise AssertionError(f"the driver exited (rc {proc.returncode}):\n{proc.files[1].read_text()[-3000:]}")
    return True


def space(cluster: Cluster, name: str, trials: int, epochs: int, params: dict = PARAMS) -> str:
    """A tiny space written to the shared folder (so the path is the same inside h1), as h1 sees it."""
    write_space(cluster.root / "nfs" / f"{name}.yaml", trials, params=params, fixed={"epochs": epochs}, early_stopping=False)
    return f"{netns.SHARED}/{name}.yaml"


def test_results_on_the_shared_folder_trials_run_over_the_hosts(cluster):
    args = [
        "sweep",
        "--space",
        space(cluster, "shared", 3, 1),
        "--data",
        "/tmp/data",
        "--results",
        f"{netns.SHARED}/results",
        "--address",
        ADDRESS,
    ]
    rc, _, err = finish(cluster.driver(args), 600)
    assert rc == 0, err[-3000:]
    trials, _ = assert_consistent(cluster.root / "nfs" / "results" / "shared", 3)
    assert set(trials["status"]) == {"completed"}
    assert trials["hostname"].nunique() >= 2 and set(trials["hostname"]) <= {"h1", "h2", "h3"}, trials[["trial_id", "hostname"]]


def test_a_uri_as_results_works_with_every_hosts_tmp_private(cluster):
    """A file:// URI on the shared folder as --results: the driver's working copy is in h1's own /tmp (its cache),
    the results and Ray's checkpoints go by URI."""
    args = [
        "sweep",
        "--space",
        space(cluster, "uri", 3, 1),
        "--data",
        "/tmp/data",
        "--results",
        f"file://{netns.SHARED}/uri",
        "--address",
        ADDRESS,
    ]
    rc, _, err = finish(cluster.driver(args), 600)
    assert rc == 0, err[-3000:]
    trials, _ = assert_consistent(cluster.root / "nfs" / "uri" / "uri", 3)
    assert set(trials["status"]) == {"completed"}
    assert list((cluster.hosts[0].tmp / "cache" / "sweeps").glob("*/uri/sweep.json"))  # the working copy: h1's private /tmp


def test_a_file_uri_on_a_folder_the_other_hosts_cannot_see_is_refused_before_decoding(cluster):
    """file:///tmp/private-uri is each host's own /tmp: Ray would refuse the trials on h2 and h3 as they start."""
    args = [
        "sweep",
        "--space",
        space(cluster, "private-uri", 2, 1),
        "--data",
        "/tmp/data",
        "--results",
        "file:///tmp/private-uri",
        "--address",
        ADDRESS,
    ]
    rc, _, err = finish(cluster.driver(args, env={"ASL_TUNE_CACHE": "/tmp/cache-private-uri"}), 300)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(
        "asl-tune: error: --results or --storage: file:///tmp/private-uri is not visible from 2 of the cluster's 3 nodes: "
    ), lines
    assert "h2 (198.18.0.2)" in lines[0] and "h3 (198.18.0.3)" in lines[0]
    assert not (cluster.hosts[0].tmp / "private-uri" / "private-uri").exists()
    assert not list((cluster.hosts[0].tmp / "cache-private-uri").rglob("images.npy"))  # nothing decoded


def test_a_results_folder_the_other_hosts_cannot_see_is_refused_before_decoding(cluster):
    """--results /tmp/results is h1's own: h2 and h3 have their own /tmp. Found by a task on each node looking for
    a file the driver wrote; refused in one line before the data is decoded, and nothing is left behind."""
    h1 = cluster.hosts[0].tmp
    args = ["sweep", "--space", space(cluster, "private", 2, 1), "--data", "/tmp/data", "--results", "/tmp/results", "--address", ADDRESS]
    rc, _, err = finish(cluster.driver(args, env={"ASL_TUNE_CACHE": "/tmp/cache-private"}), 300)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("asl-tune: error: --results: /tmp/results is not visible from 2 of the cluster's 3 nodes: "), lines
    assert "h2 (198.18.0.2)" in lines[0] and "h3 (198.18.0.3)" in lines[0] and "h1 " not in lines[0]
    assert "NFS" in lines[0] and "URI as --results" in lines[0] and "--storage" in lines[0]
    assert not (h1 / "results").exists()  # nothing created
    assert not list((h1 / "cache-private").rglob("images.npy"))  # nothing decoded


def test_a_driver_without_the_token_is_refused_in_one_line_before_decoding(cluster):
    h1 = cluster.hosts[0].tmp
    args = [
        "sweep",
        "--space",
        space(cluster, "untokened", 2, 1),
        "--data",
        "/tmp/data",
        "--results",
        f"{netns.SHARED}/results",
        "--address",
        ADDRESS,
    ]
    started = time.monotonic()
    rc, out, err = finish(cluster.driver(args, token=False, env={"ASL_TUNE_CACHE": "/tmp/cache-untokened"}), 300)
    elapsed = time.monotonic() - started
    lines = err.strip().splitlines()
    assert rc == 2 and lines == [
        f"asl-tune: error: --address: the Ray cluster at {ADDRESS} requires its authentication token and this driver sent none (RAY_AUTH_MODE is not 'token' here); "
        "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token, as for any Ray driver"
    ], err[-3000:]
    assert "gcs_client" not in out + err  # Ray's C++ log lines stay off the terminal
    assert not (cluster.root / "nfs" / "results" / "untokened").exists() and not (h1 / "cache-untokened").exists()
    assert elapsed < 5 + 15, elapsed  # Ray's own join retries for 20 s; python's start-up comes on top of our 5 s


def test_a_host_killed_and_a_host_cut_off_mid_trial_move_their_trials_to_the_head_from_their_checkpoints(cluster):
    """h3 is killed (all its processes at once) and h2's cable is pulled while each holds a trial after its first
    epoch (HOLD_ON_WORKERS; one trial per host, each has one CPU); Ray's shortened health check declares them dead,
    and Tune retries their trials on h1 from their last checkpoints: exactly 3 trials, each with epochs 1..4, none
    trained again from the start."""
    folder = cluster.root / "nfs" / "results" / "lost"
    ids = cluster.ids()
    args = [
        "sweep",
        "--space",
        space(cluster, "lost", 3, 4, LOST_PARAMS),
        "--data",
        "/tmp/data",
        "--results",
        f"{netns.SHARED}/results",
        "--address",
        ADDRESS,
    ]
    driver = cluster.driver(args)
    try:

        def past_first_epoch(host: str) -> set[str]:
            trials, epochs = read(folder, "trials"), read(folder, "epochs")
            if "node_id" not in trials or epochs.empty:
                return set()
            here = set(trials.loc[trials["node_id"] == ids[host], "trial_id"])
            return set(epochs.loc[epochs["trial_id"].isin(here) & (epochs["epoch"] >= 1), "trial_id"]) - set(
                trials.loc[trials["status"] != "running", "trial_id"]
            )

        wait_for(
            lambda: running(driver) and past_first_epoch("h2") and past_first_epoch("h3"),
            600,
            None,
            "a trial past its first epoch on h2 and on h3",
        )
        moved = past_first_epoch("h2") | past_first_epoch("h3")
        before = read(folder, "epochs").set_index(["trial_id", "epoch"])["seconds"]
        cluster.hosts[2].kill()
        cluster.hosts[1].link(False)
        rc, _, err = finish(driver, 800)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert rc == 0, err[-3000:]
    trials, epochs = assert_consistent(folder, 3)
    assert set(trials["status"]) == {"completed"}, err[-3000:]
    assert (epochs.groupby("trial_id")["epoch"].max() == 4).all()
    for tid in moved:
        assert trials.set_index("trial_id").loc[tid, "node_id"] == ids["h1"]  # where it ended
        first = epochs[(epochs.trial_id == tid) & (epochs.epoch == 1)]["seconds"].iloc[0]
        assert first == before.loc[(tid, 1)]  # its first epoch was kept, not trained again
    assert "continues from its last checkpoint" in err
