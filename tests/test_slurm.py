"""`asl-tune slurm`'s batch script under a real Slurm on this machine: a slurmctld and a slurmd (Debian's slurm-wlm)
with munge, started by the test with a configuration of its own, on 127.0.0.1. The job is preempted with SIGTERM
to its script (`scancel --batch --signal=TERM`, what `--signal=B:TERM@300` sends before a time limit), stops the
sweep cleanly, requeues itself, and its second run resumes the sweep to exactly the trials asked for.

Needs root (the daemons run as root) and slurm-wlm; where either is missing that test is skipped and says why.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import make_dataset
from sweeps import assert_consistent, read, wait_for, write_space

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scancel", "scontrol")


def why_unavailable() -> str | None:
    """Why this machine cannot run a Slurm of its own for the test, or None."""
    missing = [t for t in DAEMONS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}: apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    return None


def test_asl_tune_slurm_prints_a_batch_script_that_asks_for_a_signal_and_a_requeue_and_resumes():
    printed = subprocess.run([sys.executable, "-m", "asl_tune", "slurm"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout.startswith("#!/bin/bash\n"), printed.stderr
    lines = printed.stdout.splitlines()
    assert {"#SBATCH --signal=B:TERM@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= {line.split("  ")[0] for line in lines}
    assert "if started; then" in printed.stdout and 'command=(resume "$NAME" --results "$RESULTS")' in printed.stdout
    assert 'scontrol requeue "$SLURM_JOB_ID"' in printed.stdout
    assert subprocess.run(["bash", "-n"], input=printed.stdout, text=True).returncode == 0  # bash parses it


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, node: str, cpus: int, first_job: int) -> str:
    return (
        "\n".join(
            [
                "ClusterName=asltune",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldLogFile={root}/slurmctld.log",
                f"SlurmdLogFile={root}/slurmd.log",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # A requeued job waits out its old credential (cred_expire, 120 s by default) and then the scheduler's next pass
                # (sched_interval, 60 s): about 3 minutes. Shortened here; started sooner, slurmd refuses it ("credential revoked").
                f"AuthInfo=socket={root}/munge.socket,cred_expire=10",
                "SchedulerParameters=sched_interval=5",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SchedulerType=sched/builtin",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobRequeue=1",
                "SlurmctldParameters=enable_configless",
                "MinJobAge=600",
                "KillWait=10",
                f"FirstJobId={first_job}",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                f"PartitionName=asltune Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd with a configuration of their own; the environment Slurm's commands need."""
    if (why := why_unavailable()) is not None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    # Job ids of this run's own: the script keeps Ray's files in /tmp/ray-JOBID, removed after the test.
    (root / "slurm.conf").write_text(slurm_conf(root, node, cpus, first_job=100_000 + secrets.randbelow(800_000)))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    with ExitStack() as stack:

        def daemon(command: list[str], name: str) -> None:
            proc = subprocess.Popen(
                command, env=env, stdout=open(root / f"{name}.out", "w"), stderr=subprocess.STDOUT, start_new_session=True
            )
            stack.callback(_stop, proc)

        daemon(
            [
                tool("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge.socket",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munged.seed",
            ],
            "munged",
        )
        wait_for(lambda: (root / "munge.socket").exists(), 60, what="munged's socket")
        daemon([tool("slurmctld"), "-D", "-i", "-f", str(root / "slurm.conf")], "slurmctld")
        daemon([tool("slurmd"), "-D", "-N", node, "-f", str(root / "slurm.conf")], "slurmd")
        wait_for(
            lambda: "idle" in subprocess.run([tool("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout,
            120,
            what="the Slurm node to be idle",
        )
        yield env, root


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass


def job_state(env: dict, job: str) -> dict[str, str]:
    """`scontrol show job JOB` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run([tool("scontrol"), "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_sbatch_script_stops_on_sigterm_requeues_itself_and_resumes_to_exactly_n_trials(slurm, tmp_path):
    env, root = slurm
    data = make_dataset(tmp_path / "data", per_class=20, size=32)
    space = write_space(
        tmp_path / "slurm.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 4},
        early_stopping=False,
    )
    script = tmp_path / "asl-tune.sbatch"
    script.write_text(subprocess.run([sys.executable, "-m", "asl_tune", "slurm"], capture_output=True, text=True, check=True).stdout)
    bin_dir = Path(sys.executable).parent
    job_env = {
        **env,
        "ASL_TUNE_NAME": "slurm",
        "ASL_TUNE_RESULTS": str(tmp_path / "results"),
        "ASL_TUNE_HEAD_IP": "127.0.0.1",
        "ASL_TUNE_SWEEP_ARGS": f"--space {space} --data {data} --max-concurrent 1",
        "ASL_TUNE_COMMAND": str(bin_dir / "asl-tune"),
        "ASL_TUNE_RAY_COMMAND": str(bin_dir / "ray"),
        "ASL_TUNE_PYTHON": sys.executable,
        "PATH": f"{bin_dir}:{env['PATH']}",
    }
    out = root / "job.out"  # kept with the daemons' logs
    submitted = subprocess.run(
        [
            tool("sbatch"),
            "--parsable",
            "--nodes=1",
            f"--cpus-per-task={os.cpu_count() or 1}",
            f"--output={out}",
            "--chdir",
            str(tmp_path),
            str(script),
        ],
        env=job_env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    folder = tmp_path / "results" / "slurm"
    try:
        # Preempted once the first trial has an epoch written (and so a checkpoint) and the second is still to come.
        wait_for(
            lambda: len(read(folder, "epochs")) >= 1 or job_state(env, job).get("JobState") not in ("PENDING", "RUNNING"),
            300,
            what="the job's first epoch",
        )
        assert job_state(env, job).get("JobState") == "RUNNING", (job_state(env, job), _text(out))
        subprocess.run([tool("scancel"), "--batch", "--signal=TERM", job], env=job_env, check=True)
        wait_for(
            lambda: job_state(env, job).get("Restarts") == "1" or job_state(env, job).get("JobState") != "RUNNING",
            300,
            what="the job to requeue itself",
        )
        requeued = job_state(env, job)
        assert requeued.get("Restarts") == "1" and requeued.get("JobState") in ("PENDING", "REQUEUED", "RUNNING", "CONFIGURING"), (
            requeued,
            _text(out)[-4000:],
        )
        wait_for(
            lambda: job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
            400,
            what="the requeued job to end",
        )
    finally:
        subprocess.run([tool("scancel"), job], env=job_env, capture_output=True)
        shutil.rmtree(f"/tmp/ray-{job}", ignore_errors=True)  # Ray's session files, left by the job's Ray head
    state, text = job_state(env, job), _text(out)
    assert state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1", (state, text[-4000:])
    assert "SIGTERM: stopping the sweep, then requeueing" in text and "stopped by SIGTERM" in text, text[-4000:]
    assert f"asl-tune resume slurm --results {tmp_path / 'results'}" in text  # the second run resumed
    trials, _ = assert_consistent(folder, 2)
    assert set(trials["status"]) == {"completed"}, text[-4000:]


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
