"""The processes the sweep (one per run) and the tuner (one per trial) start: they die with the process that
started them, never take its launcher's rank, and can be killed with everything they started.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Sequence

# A process started as one task of a multi-task launch (srun -n 4, torchrun) must not hand its rank to a run it
# starts: Lightning would take the run for one rank of a bigger job. Such a run is a job of its own on this machine.
# TORCHELASTIC_RUN_ID is what Lightning's TorchElasticEnvironment detects torchrun by.
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS")
PR_SET_PDEATHSIG = 1


def environment(own_job: bool = True) -> dict[str, str]:
    """This process's environment for a child; ``own_job``: without the launcher's rank variables."""
    hidden = set(LAUNCHER_VARIABLES) if own_job else set()
    return {key: value for key, value in os.environ.items() if key not in hidden}


def die_with_parent(parent_pid: int) -> None:
    """In the child (before exec): get SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), so that a killed
    sweep or tuning worker leaves no orphan training that writes rows or trials later. A parent that died before
    this call (the child was already adopted) ends the child at once. Elsewhere nothing happens: a killed parent
    may leave its current child finishing on its own."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def start(command: Sequence[str], own_group: bool = False, **popen) -> subprocess.Popen:
    """``subprocess.Popen(command, **popen)`` for a child that dies with this process; ``own_group``: in a process
    group of its own, so that :func:`kill_group` ends it with everything it started (DDP ranks, loader workers)."""
    parent = os.getpid()
    return subprocess.Popen(list(command), preexec_fn=lambda: die_with_parent(parent), start_new_session=own_group, **popen)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process group of a child started with ``own_group``, then wait for the child."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
