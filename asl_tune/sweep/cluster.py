"""Where a sweep's trials run: a private Ray instance on this machine's loopback, or a cluster at --address.

A local instance binds to 127.0.0.1 and starts no dashboard unless asked, so nothing is exposed
to the network. Ray's ports have no authentication: a cluster must stay inside a trusted network.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from asl_tune.errors import AslTuneError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # how long --address may stay silent before we give up
# How long a running sweep's Ray head (its GCS) may stay silent before the driver ends the sweep with the resume
# command (watch_head). Ray's own driver ends the process after 60 s, with one C++ line and no word of resume.
LOST_HEAD_ENV, LOST_HEAD_S = "ASL_TUNE_LOST_HEAD_S", 30.0
HEAD_PROBE_S = 2.0  # how often watch_head asks the head
DEFAULT_RAY_PORT = 6379
# HTTP/2's client connection preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")

# Settings Ray reads from the environment of the process that starts it.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # otherwise Ray swaps 127.0.0.1 for the outward address
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # our Parquet is the record; skip Ray's CSV/JSON/TensorBoard copies
    "RAY_DEDUP_LOGS": "1",
    # A stopped trial (ASHA, or the sweep stopping on SIGTERM or Ctrl-C) is ended within this many seconds instead
    # of when its epoch ends (Tune's default waits up to 600 s): what it loses is redone from its last checkpoint.
    "TUNE_FORCE_TRIAL_CLEANUP_S": "5",
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # run._stop_on_signals handles Ctrl-C and SIGTERM alike, through Tune's SIGUSR1 handler
}
# Tune saves its experiment state, every trial of the run in one JSON file, at most once a SAVE_PERIOD_KEY seconds.
# A save costs about 90 us a trial on the 2-core box (py-spy at 2,800 trials: a quarter of the driver's time
# with a save every second), so the period grows by a second for every TRIALS_PER_SAVE_S trials: saves stay
# near 5% of the driver's time at any size, and every second (a killed driver loses little) up to 500 trials.
SAVE_PERIOD_KEY = "TUNE_GLOBAL_CHECKPOINT_S"
TRIALS_PER_SAVE_S = 500


# Tune keeps at most PENDING_KEY trials waiting for a worker; for a searcher without a ConcurrencyLimiter (asl-tune's,
# unless --max-concurrent) that is 1. With reused workers (reuse_actors) the worker a trial ends on goes to the one
# pending trial, and the second worker Tune began to start for it is dropped: short trials then run one at a time on
# any number of CPUs (bench/RESULTS.md §8). As many pending as trials fit at once keeps every slot fed.
PENDING_KEY = "TUNE_MAX_PENDING_TRIALS_PG"


def tune_environment(num_samples: int, at_once: int) -> dict[str, str]:
    """What Tune reads as a run of num_samples trials, at_once of them at a time (the memory plan's), starts
    (see scoped_environment, where a user's own setting wins): how often it saves its state, and how many trials wait."""
    return {SAVE_PERIOD_KEY: f"{max(1.0, num_samples / TRIALS_PER_SAVE_S):g}", PENDING_KEY: str(max(1, at_once))}


# Run in every worker Ray starts for us: imports the trainer (torch) before the first trial asks for it.
WARM_UP = "asl_tune.sweep.trainable.warm_up"
# The driver's settings its trials on a joined cluster's nodes get too (a local Ray's workers inherit them anyway):
# ASL_TUNE_DEVICE, train.DEVICE_ENV (not imported: the driver never loads torch).
FORWARDED_ENV = ("ASL_TUNE_DEVICE",)
# Bound how long joining a dead cluster may take (Ray's default retries for minutes).
JOIN_ENV = {"RAY_NUM_REDIS_GET_RETRIES": "2", "RAY_py_gcs_connect_timeout_s": "5", "RAY_gcs_rpc_server_connect_timeout_s": "5"}


def parse_address(address: str) -> tuple[str, int] | None:
    """host and port of `--address host[:port]` (also ray://host:port); None for `auto`."""
    if address == "auto":
        return None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", str(DEFAULT_RAY_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AslTuneError(f"--address: must be host:port (or auto), got {address!r}")
    return host, int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within timeout_s, with one line, unless something at the cluster's address answers as Ray does.

    Ray's GCS (and its client server, ray://) speak gRPC, which answers HTTP/2's connection preface
    with a SETTINGS frame at once; a port that accepts the connection and then says nothing is not Ray,
    and ray.init would wait on it for a minute.
    """
    target = parse_address(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    stage = "connecting"
    try:
        with socket.create_connection(target, timeout=timeout_s) as sock:
            stage = "waiting for an answer"
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.sendall(HTTP2_PREFACE)
            sock.recv(9)
    except OSError as e:
        if isinstance(e, TimeoutError):
            why = "timed out connecting" if stage == "connecting" else "it accepted the connection but never answered"
        else:
            why = e.strerror or type(e).__name__
        raise AslTuneError(
            f"--address: no Ray cluster answers at {address} ({why}; gave up after at most {timeout_s:.0f} s); "
            "start one with `ray start --head` or `ray up CLUSTER.yaml`"
        ) from None


# Run in a child process: asks the cluster's GCS for its id the way ray.init does, with whatever token this driver's
# settings would send. A refused token costs ray.init 20 s of retries and Ray's C++ log lines on the terminal;
# here it is one exception within a second, and the child's stderr (the one C++ line) is never shown.
AUTH_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"asl-tune-probe", None, timeout=3)
except Exception as e:
    if type(e).__name__ == "AuthenticationError":
        print("unauthenticated")
"""
AUTH_HINT = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token, as for any Ray driver"


def check_authenticated(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail with one line, within about timeout_s, when the cluster uses Ray's token authentication and refuses this
    driver (no token sent, or not the cluster's). Anything else the probe meets is left to ray.init to report."""
    import subprocess
    import sys

    if address.startswith("ray://") or address == "auto":  # Ray Client's server has no token check of its own to probe
        return
    host, port = parse_address(address)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", AUTH_PROBE, f"{host}:{port}"],
            env={**JOIN_ENV, **os.environ},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return
    if probe.stdout.strip() == "unauthenticated":
        sent = (
            "the token this driver sent is not the cluster's"
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else "this driver sent none (RAY_AUTH_MODE is not 'token' here)"
        )
        raise AslTuneError(f"--address: the Ray cluster at {address} requires its authentication token and {sent}; {AUTH_HINT}")


def check_address(address: str) -> None:
    """Before anything is decoded or created: a Ray cluster answers at address (check_reachable) and accepts this driver (check_authenticated)."""
    check_reachable(address)
    check_authenticated(address)


def check_storage_visible(address: str | None, folder: Path, storage: str | None, timeout_s: float = 120.0) -> None:
    """Refuse, in one line, checkpoint storage that some node of a joined cluster cannot see: the sweep folder (no
    --storage, --results a folder) or a file:// URI (as --results or --storage), each node's own filesystem.
    Trials there would error at their first checkpoint, or as they start (Ray checks a file its driver wrote).

    Checked for real: the driver writes a marker file in the folder (or the nearest folder of the URI's path that
    exists), a task pinned to each alive node looks for it (no CPU asked, so a busy node answers too), and the
    marker is removed. A local Ray has one node, on this machine; s3:// and gs:// are the same everywhere.
    """
    if address is None or (storage and not storage.startswith("file://")):
        return
    where = Path(storage[len("file://") :]) if storage else Path(folder)
    shown, option = (storage, "--results or --storage") if storage else (str(Path(folder).parent), "--results")
    existing = next((p for p in [where, *where.parents] if p.is_dir()), None)
    if existing is None:
        return  # nowhere to write a marker: Ray reports what it finds
    try:
        seen = nodes_seeing(existing, timeout_s)
    except OSError:  # the folder refuses the marker: Ray reports what it finds
        return
    nodes = list(seen)
    blind = [f"{node['NodeManagerHostname']} ({node['NodeManagerAddress']})" for node, sees in seen.items() if not sees]
    if blind:
        raise AslTuneError(
            f"{option}: {shown} is not visible from {len(blind)} of the cluster's {len(nodes)} nodes: {', '.join(blind)}; "
            "Ray keeps the trials' checkpoints there, so give a folder every node mounts at the same path (NFS), "
            "a URI as --results that every node reaches (s3://, gs://, or file:// on such a folder), or --storage URI for the checkpoints"
        )


class _Node(dict):
    """A node as ray.nodes() describes it, hashable by its id (a key of nodes_seeing's answer)."""

    def __hash__(self) -> int:
        return hash(self["NodeID"])


def nodes_seeing(folder: Path, timeout_s: float = 120.0) -> dict[_Node, bool]:
    """Each alive node of the running Ray (as ray.nodes() describes it), and whether it sees this machine's `folder`:
    the driver writes a marker file there, a task pinned to each node looks for it (no CPU asked, so a busy node
    answers too; a node whose worker cannot start, or that does not answer within timeout_s, does not see it), and
    the marker is removed. Raises OSError when the folder refuses the marker."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def sees(path: str) -> bool:  # defined here so that it travels by value: nodes need not import asl_tune
        import os

        return os.path.exists(path)

    marker = Path(folder) / f".asl-tune-visible-{secrets.token_hex(8)}"
    marker.write_bytes(b"")
    try:
        nodes = [_Node(n) for n in ray.nodes() if n["Alive"]]
        look = ray.remote(num_cpus=0, max_retries=0)(sees)
        asked = {
            look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker)): n for n in nodes
        }
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        seen = {}
        for ref, node in asked.items():
            try:
                seen[node] = ref in answered and bool(ray.get(ref))
            except Exception:  # a node whose worker could not start: it cannot be shown the folder either
                seen[node] = False
        return seen
    finally:
        marker.unlink(missing_ok=True)


@contextmanager
def scoped_environment(defaults: dict[str, str]) -> Iterator[None]:
    """os.environ with each of `defaults` set where it is unset, for the block; afterwards those as they were.

    Only ours are put back. Ray's own start also sets some (RAY_AUTH_MODE, RAY_USAGE_STATS_ENABLED) to match
    the configuration it keeps for the rest of this process; undoing those leaves the two out of step, and a
    later Ray in the same process then cannot start its actors (seen: every trial "cancelled before it started").
    """
    before = {key: os.environ.get(key) for key in defaults}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, dashboard: bool = False, ship_code: bool = True
) -> Iterator[None]:
    """Ray, started or joined for the duration of the block; reuses an instance already running in this process.

    Joining a cluster, this asl_tune package goes to its workers (ship_code: Ray's runtime_env py_modules), so
    nodes need only the dependencies and run the driver's version of the trainer; ship_code=False uses theirs.

    Ray reads LOCAL_ENV (and JOIN_ENV) as it starts its processes, and Tune as it runs: they are set before
    ray.init, and os.environ is put back as it was after ray.shutdown (also when the block raises).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    with scoped_environment({**LOCAL_ENV, **(JOIN_ENV if address else {})}):
        if address:
            _join(address, ship_code)
        else:
            _start_local(num_cpus, num_gpus, dashboard)
        try:
            yield
        finally:
            ray.shutdown()


def job_runtime_env(ship_code: bool = True) -> dict | None:
    """The runtime_env a joined cluster's workers get: this asl_tune package (the driver's copy, edits included)
    unless ship_code is False, and the driver's FORWARDED_ENV settings; None when there is neither."""
    import asl_tune

    env: dict = {}
    if ship_code:
        env.update(py_modules=[str(Path(asl_tune.__file__).resolve().parent)], excludes=["__pycache__", "*.pyc"])
    forwarded = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    if forwarded:
        env["env_vars"] = forwarded
    return env or None


def _join(address: str, ship_code: bool = True) -> None:
    import ray

    check_address(address)
    try:
        ray.init(address=address, runtime_env=job_runtime_env(ship_code), log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as e:
        # An explicit address never sends Ray's token unless asked to (Ray's rule): say so when it may be the cause.
        hint = "" if os.environ.get("RAY_AUTH_MODE") else f"; if the cluster uses token authentication, {AUTH_HINT}"
        raise AslTuneError(f"--address: cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}{hint}") from None


def _start_local(num_cpus: int | None, num_gpus: int | None, dashboard: bool) -> None:
    """A private Ray on 127.0.0.1, its workers warmed up (WARM_UP), with a dashboard only when asked."""
    import ray

    context = ray.init(
        address="local",
        runtime_env={"worker_process_setup_hook": WARM_UP},
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    if dashboard:
        log.warning("Ray dashboard (no authentication, on 127.0.0.1 only): http://%s", context.dashboard_url)


def resources() -> dict[str, float]:
    """The cluster's total CPUs and GPUs (Ray must be running)."""
    import ray

    total = ray.cluster_resources()
    return {"cpu": float(total.get("CPU", 0)), "gpu": float(total.get("GPU", 0))}


def lost_head_after_s() -> float:
    """LOST_HEAD_S, or the user's ASL_TUNE_LOST_HEAD_S (longer for a head that restarts itself slowly, e.g. GCS fault tolerance)."""
    text = os.environ.get(LOST_HEAD_ENV, "")
    try:
        value = float(text) if text else LOST_HEAD_S
    except ValueError:
        value = -1.0
    if not 0 < value < 60:
        raise AslTuneError(f"{LOST_HEAD_ENV}: must be seconds above 0 and below 60 (Ray's driver gives up at 60), got {text!r}")
    return value


@contextmanager
def watch_head(on_lost: Callable[[str, float], None]) -> Iterator[None]:
    """For the block, a daemon thread asks the head's GCS every HEAD_PROBE_S whether it answers (check_reachable). Once it
    has not for lost_head_after_s(), on_lost(address, seconds) runs on that thread; it is to end the process, for the
    driver's Ray cannot go on without its head. Not through Ray Client (ray://), whose server is the head's to watch."""
    import ray

    after_s = lost_head_after_s()
    if ray.util.client.ray.is_connected():
        yield
        return
    address = ray.get_runtime_context().gcs_address
    stop = threading.Event()

    def watch() -> None:
        silent_since = None
        while not stop.wait(HEAD_PROBE_S):
            try:
                check_reachable(address, timeout_s=HEAD_PROBE_S)
                silent_since = None
            except AslTuneError:
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since >= after_s and not stop.is_set():
                    on_lost(address, after_s)
                    return

    thread = threading.Thread(target=watch, name="asl-tune-watch-head", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
