"""Hosts for tests, made on this machine from Linux namespaces: each with its own network (an address on
198.18.0.0/24, the benchmarking range no real network uses, through a bridge in the root namespace), mount,
PID and UTS namespaces, a private /tmp, and one folder bound into all of them at /tmp/nfs (the shared "NFS").

Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (`why_unavailable` says what is missing). `hosts` removes every
namespace, link, mount and process it made, however its block ends: a host's processes all live in its PID
namespace, so killing its first process ends them all, and its mounts go with its mount namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUBNET = "198.18.0"  # RFC 2544's benchmarking range: never routed, never a real network's
SHARED = "/tmp/nfs"  # where every host sees the shared folder
KEEP_VISIBLE = (sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1]))  # the venv, Python, the repo


def why_unavailable() -> str | None:
    """Why this process cannot make namespace hosts, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    probe = f"a26p{os.getpid() % 100000}"
    made = subprocess.run(["ip", "link", "add", probe, "type", "bridge"], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network link (CAP_NET_ADMIN): {made.stderr.strip()}"
    subprocess.run(["ip", "link", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One namespace host: `run` starts a process inside it; `kill` ends all its processes; `link` cuts its cable."""

    name: str  # its hostname (UTS namespace)
    ip: str  # its address on SUBNET
    netns: str  # its network namespace's name (ip netns)
    veth: str  # the root namespace's end of its cable, on the bridge
    tmp: Path  # its private /tmp, as the root namespace sees it
    env: dict = field(default_factory=dict)  # what every process started in it gets
    init: subprocess.Popen | None = None  # `unshare`, whose child is the host's first process (PID 1 inside)
    pid1: int = 0  # that first process, as the root namespace numbers it

    def run(self, command: list[str], env: dict | None = None, cwd: str = "/tmp", **popen) -> subprocess.Popen:
        """command inside the host (all its namespaces), with the host's environment plus env."""
        enter = ["nsenter", f"--target={self.pid1}", "--net", "--mount", "--uts", "--pid", f"--wd={cwd}", "--"]
        return subprocess.Popen([*enter, *command], env={**self.env, **(env or {})}, **popen)

    def kill(self) -> None:
        """SIGKILL every process of the host at once: its PID namespace ends with its first process."""
        if self.init is not None and self.init.poll() is None:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.init.wait(timeout=30)

    def link(self, up: bool) -> None:
        """Plug (up) or pull (down) the host's cable: its end on the bridge."""
        _ip("link", "set", self.veth, "up" if up else "down")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@contextmanager
def hosts(root: Path, count: int, env: dict) -> Iterator[list[Host]]:
    """count hosts (h1 at SUBNET.1, ...), with root/nfs bound into each at SHARED, for the block; nothing of them after it."""
    tag = f"a26{os.getpid() % 100000}"  # names unique to this process, within the 15 characters a link name may have
    (root / "nfs").mkdir(parents=True, exist_ok=True)
    made: list[Host] = []
    with ExitStack() as undo:
        bridge = f"{tag}br"
        _ip("link", "add", bridge, "type", "bridge")
        undo.callback(_ip, "link", "del", bridge, check=False)
        _ip("link", "set", bridge, "up")
        for i in range(1, count + 1):
            name, netns, veth = f"h{i}", f"{tag}h{i}", f"{tag}v{i}"
            _ip("netns", "add", netns)
            undo.callback(_ip, "netns", "del", netns, check=False)  # its end of the cable goes with it, and so the pair
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{tag}e{i}")
            undo.callback(_ip, "link", "del", veth, check=False)
            _ip("link", "set", f"{tag}e{i}", "netns", netns)
            _ip("link", "set", veth, "master", bridge, "up")
            for args in (
                ["link", "set", "lo", "up"],
                ["link", "set", f"{tag}e{i}", "name", "eth0"],
                ["addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
            ):
                _ip("-n", netns, *args)
            host = Host(name, f"{SUBNET}.{i}", netns, veth, root / f"{name}-tmp", env={**env, "HOME": "/tmp", "TMPDIR": "/tmp"})
            undo.callback(host.kill)
            _start(host, root / "nfs")
            made.append(host)
        yield made


def _start(host: Host, shared: Path) -> None:
    """The host's first process: its mounts made (the shared folder, what must stay visible, the private /tmp), then asleep."""
    (host.tmp / "nfs").mkdir(parents=True, exist_ok=True)
    binds = [f"mount --bind {shared} {host.tmp}/nfs"]
    for keep in {str(Path(p).resolve()) for p in KEEP_VISIBLE}:
        if keep.startswith("/tmp/"):  # the venv of a CI run lives under /tmp: seen at the same path in the host
            inside = host.tmp / keep[len("/tmp/") :]
            inside.mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --rbind {keep} {inside}")
    script = "; ".join([f"hostname {host.name}", *binds, f"mount --rbind {host.tmp} /tmp", "touch /tmp/.ready", "exec sleep infinity"])
    host.init = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            host.netns,
            "unshare",
            "--mount",
            "--uts",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not (host.tmp / ".ready").exists() or not _children(host.init.pid):
        if host.init.poll() is not None:
            raise RuntimeError(f"host {host.name} did not start: {host.init.stderr.read().strip()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"host {host.name} did not start within 30 s")
        time.sleep(0.05)
    host.pid1 = _children(host.init.pid)[0]
