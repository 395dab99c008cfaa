"""A Slurm batch script that runs a sweep on the job's nodes, printed by `asl-tune slurm`.

It starts Ray's head on the job's first node and a worker on each other node (srun), then the sweep; it asks
Slurm for SIGTERM before the time limit, stops the sweep cleanly on it (Tune saves its state) and requeues the
job, which then resumes the sweep. tests/test_slurm.py runs it under a real slurmctld and slurmd.
"""

from __future__ import annotations

SCRIPT = r"""#!/bin/bash
# asl-tune on Slurm: Ray's head on the job's first node, a Ray worker on each other node, then the sweep.
#
#   asl-tune slurm > asl-tune.sbatch     # edit the #SBATCH lines and the settings below, then:
#   sbatch asl-tune.sbatch
#
# Preemption and time limits: Slurm sends this script SIGTERM 5 minutes before the time limit (--signal);
# on SIGTERM (that one, or `scancel --batch --signal=TERM JOB`) the script stops the sweep cleanly (Tune
# saves its state, every result is written) and requeues the job (--requeue). When the job runs again, the
# sweep resumes where it stopped: `asl-tune resume` when RESULTS/NAME/sweep.json exists, `asl-tune sweep`
# otherwise, so the job's script is the same every time it runs. A job that Slurm preempts with
# PreemptMode=REQUEUE is requeued by Slurm itself and resumes the same way.
#
# The nodes need asl-tune's dependencies (pip install asl-tune in a virtual environment they all see) and
# RESULTS on a filesystem every node mounts at the same path (or a URI): asl-tune refuses a folder that some
# node cannot see. Each run of the job makes a Ray authentication token of its own, so other users of the
# nodes cannot join its Ray cluster.
#
#SBATCH --job-name=asl-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
##SBATCH --gpus-per-task=1          # on a GPU partition: remove one '#' (and set --gpus-per-trial below)
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@300         # SIGTERM to this script 300 s before the time limit
#SBATCH --requeue                   # a stopped or preempted job runs again, and resumes the sweep
#SBATCH --open-mode=append          # each run of the job appends to the same output file
#SBATCH --output=asl-tune-%j.out

set -uo pipefail

# --- settings (or set these variables in the environment sbatch is run from) ---
NAME="${ASL_TUNE_NAME:-slurm}"                       # the sweep's name: RESULTS/NAME
RESULTS="${ASL_TUNE_RESULTS:-$PWD/results}"          # a folder every node sees at this path, or a URI
SWEEP_ARGS="${ASL_TUNE_SWEEP_ARGS:---space default --cpus-per-trial 2}"  # asl-tune sweep's options (not --name, --results, --address)
ASL_TUNE="${ASL_TUNE_COMMAND:-asl-tune}"             # the asl-tune command (a venv's bin/asl-tune, say)
RAY="${ASL_TUNE_RAY_COMMAND:-ray}"                   # Ray's command, from the same environment
PYTHON="${ASL_TUNE_PYTHON:-python3}"                 # that environment's Python (to look for a sweep at a URI)

HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
HEAD_IP="${ASL_TUNE_HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}"  # this script runs on the first node
PORT="${ASL_TUNE_RAY_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"  # one per job, so jobs sharing a node do not collide
CPUS="${SLURM_CPUS_PER_TASK:-$(nproc)}"
say() { echo "asl-tune.sbatch $(date -u '+%F %T'): $*"; }
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"  # this run's own token
say "job $SLURM_JOB_ID (run $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $SLURM_JOB_NODELIST; Ray's head at $HEAD_IP:$PORT"

"$RAY" start --head --block --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$CPUS" \
    --include-dashboard=false --disable-usage-stats --temp-dir="/tmp/ray-$SLURM_JOB_ID" &
head=$!
workers=
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    srun --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) --exclude="$HEAD_NODE" \
        "$RAY" start --block --address="$HEAD_IP:$PORT" --num-cpus="$CPUS" --disable-usage-stats &
    workers=$!
fi
stop_ray() { kill -TERM $workers $head 2>/dev/null; wait $workers $head 2>/dev/null; }
trap stop_ray EXIT

for _ in $(seq 120); do  # the head answers within seconds; asl-tune then joins it (and waits for nothing else)
    "$RAY" health-check --address="$HEAD_IP:$PORT" >/dev/null 2>&1 && break
    sleep 1
done

started() {  # has the sweep begun (RESULTS/NAME/sweep.json), in a folder or at a URI?
    case "$RESULTS" in
        *://*) "$PYTHON" -c 'import sys, pyarrow.fs as f; fs, path = f.FileSystem.from_uri(sys.argv[1]); sys.exit(fs.get_file_info(path).type == f.FileType.NotFound)' "$RESULTS/$NAME/sweep.json" ;;
        *) [ -e "$RESULTS/$NAME/sweep.json" ] ;;
    esac
}
if started; then  # a requeued job, or a sweep begun by hand: finish it (a finished one exits 0 with nothing to do)
    command=(resume "$NAME" --results "$RESULTS")
else
    command=(sweep --name "$NAME" --results "$RESULTS" $SWEEP_ARGS)
fi
say "asl-tune ${command[*]} --address $HEAD_IP:$PORT"
"$ASL_TUNE" "${command[@]}" --address "$HEAD_IP:$PORT" &
driver=$!

stopping=
on_term() {  # the sweep stops cleanly (it saves its state), then the job goes back in the queue
    say "SIGTERM: stopping the sweep, then requeueing job $SLURM_JOB_ID"
    stopping=1
    kill -TERM "$driver" 2>/dev/null
}
trap on_term TERM
while :; do
    wait "$driver"
    status=$?
    kill -0 "$driver" 2>/dev/null || break  # else the wait was cut short by SIGTERM: the driver is still stopping
done
say "asl-tune exited with status $status"
# 0: done; 3: done, some trials errored; 2: bad input; 4: Ray failed (resumable); 128+15: stopped by SIGTERM (resumable)
if [ -n "$stopping" ] && { [ "$status" -eq 143 ] || [ "$status" -eq 4 ]; }; then
    stop_ray
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def script() -> str:
    """The sbatch script, as `asl-tune slurm` prints it."""
    return SCRIPT
