"""Sweeps: the grid methods x labeled ratios x seeds on one dataset, one `run` per point, into the leaderboard.

How a sweep stays fair, resumable and safe to run several times at once:

- **Planning without training.** Every point is a :class:`~benchmark.run_request.RunRequest`, finished into its
  config by the step the run itself takes (``RunRequest.finalized``, benchmark/finalize.py), so its config hash is
  the hash the run will write; no DataModule is built and no method imported. Bad input (unknown method, a method
  that does not fit the dataset, empty grid, missing data, damaged or locked leaderboard) stops the sweep here,
  before anything trains.
- **Skip what is done, resume what was cut short.** A point is done when the leaderboard holds a row with
  status ``ok`` for the same dataset, config hash and seed. Failed rows do not count: the next sweep retries
  them. A point whose run was killed (its folder holds a checkpoint but its rows are missing) continues from
  that checkpoint (``run --resume``) rather than training from the start.
- **One runner per point.** Before a point runs, the sweep takes an exclusive ``flock`` claim on
  ``<leaderboard_dir>/.claims/<dataset>-<hash>-s<seed>.lock`` and re-reads the leaderboard. Two sweeps over one
  grid therefore never run a point twice; the kernel drops the claim of a killed sweep, so no stale claim blocks a
  resume.
- **Isolation.** Each run is its own subprocess (a crash, an OOM kill or a CUDA error does not end the sweep).
  The run inherits the claim and dies with the sweep (benchmark/child_processes.py): a sweep killed inside a run leaves no
  row for it, since rows are only appended, atomically, at the end of a run (``leaderboard.append_rows``).
  A run that raises writes its own ``failed`` row (run.py); a run that dies without one (signal, OOM) gets a
  ``failed`` row from the sweep. A run stopped by SIGTERM or SIGINT (exit 143 / 130, benchmark/stops.py) gets no
  row: it is reported ``stopped``, is not done, and the next sweep resumes its folder. Either way the sweep goes on
  and exits with 1 at the end.
- **Scale out.** ``--shard i/n`` keeps every n-th point starting at i (0-based) of the deterministic grid order, so
  n machines split a grid without talking to each other. ``--launcher slurm`` submits each point as a SLURM job
  through submitit (``submitit-local`` runs the same path as local processes, for testing it).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmark import child_processes
from benchmark.leaderboard import append_rows, check_writable, locked, read_leaderboard
from benchmark.run_request import RunRequest
from core.errors import UserError, unknown_name

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class GridPoint:
    method: str
    ratio: float
    seed: int

    def describe(self) -> str:
        return f"{self.method} ratio={self.ratio:g} seed={self.seed}"


def _unique(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def split_words(values: Sequence[str]) -> list[str]:
    """``["a b", "c,d"]`` -> ``["a", "b", "c", "d"]``: METHODS="a b" arrives as one word or several."""
    return [word for value in values for word in value.replace(",", " ").split()]


def expand_grid(methods: Sequence[str], ratios: Sequence[float], seeds: Sequence[int]) -> list[GridPoint]:
    """Every (method, ratio, seed), seeds outermost: all methods of seed 0 finish before any seed 1 starts, so a
    sweep stopped half way has comparable rows. Repeated values are dropped; unknown methods are a UserError."""
    from benchmark.catalogue import catalogue

    methods, ratios, seeds = _unique(methods), _unique(ratios), _unique(seeds)
    empty = [name for name, values in (("METHODS", methods), ("RATIOS", ratios), ("SEEDS", seeds)) if not values]
    if empty:
        raise UserError(f"the sweep grid is empty: no {' and no '.join(empty)} given",
                        fix='e.g. make sweep METHODS="supervised mean_teacher" RATIOS="0.05 0.1" SEEDS="0 1 2"')
    known = catalogue()["methods"]
    for method in methods:
        if method not in known:
            raise unknown_name("method", method, known)
    for ratio in ratios:
        if not 0 < ratio <= 1:
            raise UserError(f"RATIOS holds {ratio:g}: each ratio must be a number in (0, 1]", fix="e.g. RATIOS=\"0.05 0.1 1.0\"")
    return [GridPoint(method, float(ratio), int(seed)) for seed in seeds for ratio in ratios for method in methods]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r} is not of the form i/n with 0 <= i < n", fix="e.g. --shard 0/4 ... --shard 3/4")
    return index, count


def shard(points: Sequence[GridPoint], index: int, count: int) -> list[GridPoint]:
    """Every ``count``-th point starting at ``index``: shards are disjoint, cover the grid and mix methods."""
    return list(points[index::count])


@dataclass
class SweepOptions:
    dataset: str
    methods: list[str]
    ratios: list[float]
    seeds: list[int]
    profile: str = "cpu"
    data_root: str | None = None
    devices: int | None = None
    num_nodes: int | None = None
    out: str = "runs"
    leaderboard_dir: str = "leaderboards"
    wandb: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    shard: str | None = None
    launcher: str = "local"
    in_process: bool = False
    progress: bool = False
    dry_run: bool = False
    # submitit / SLURM executor parameters
    slurm_partition: str | None = None
    slurm_gpus_per_node: int | None = None
    slurm_cpus_per_task: int | None = None
    slurm_mem_gb: int | None = None
    slurm_time_min: int = 24 * 60
    slurm_max_parallel: int | None = None
    slurm_setup: list[str] = field(default_factory=list)
    slurm_params: list[str] = field(default_factory=list)

    def sweep_name(self) -> str:
        """The W&B group of the sweep's runs. By default a digest of the grid, so shards and resumes of one grid
        share it without being told."""
        if self.name:
            return self.name
        grid = repr((self.dataset, self.profile, sorted(self.methods), sorted(self.ratios), sorted(self.seeds), sorted(self.overrides)))
        return f"{self.dataset}-{self.profile}-{hashlib.sha256(grid.encode()).hexdigest()[:8]}"

    @property
    def leaderboard(self) -> Path:
        return Path(self.leaderboard_dir) / f"{self.dataset}.csv"


@dataclass
class PlannedRun:
    index: int
    point: GridPoint
    request: RunRequest
    config: dict[str, Any]  # finished exactly as run.run() will have it
    config_hash: str

    @property
    def argv(self) -> list[str]:
        """The point's `python -m benchmark run` command line (without the program), for a run in its own process."""
        return self.request.argv()

    @property
    def key(self) -> tuple[str, str, str]:
        return self.config["dataset"], self.config_hash, str(self.point.seed)

    def describe(self, total: int) -> str:
        return f"{self.index + 1}/{total} {self.point.describe()} (config {self.config_hash})"


def run_request(options: SweepOptions, point: GridPoint) -> RunRequest:
    return RunRequest(method=point.method, dataset=options.dataset, profile=options.profile, data_root=options.data_root,
                      ratio=point.ratio, seed=point.seed, devices=options.devices, num_nodes=options.num_nodes,
                      out=str(options.out), leaderboard_dir=str(options.leaderboard_dir), wandb=options.wandb,
                      progress=options.progress, overrides=[f"run.sweep={options.sweep_name()}", *options.overrides])


def plan(options: SweepOptions) -> list[PlannedRun]:
    """This shard's points with their finished configs and hashes (nothing is built, trained or written)."""
    from benchmark.config import config_hash

    if options.launcher not in LAUNCHERS:
        raise unknown_name("launcher", options.launcher, LAUNCHERS)
    points = expand_grid(options.methods, options.ratios, options.seeds)
    index, count = parse_shard(options.shard)
    points = shard(points, index, count)
    if not points:
        raise UserError(f"shard {index}/{count} of this {count}-way split holds no grid point", fix="use fewer shards than grid points")
    if options.in_process and (options.devices or 1) * (options.num_nodes or 1) > 1:
        raise UserError("--in-process cannot run DDP (Lightning re-launches the command line per rank)", fix="drop --in-process")
    check_writable(Path(options.out))
    planned = []
    for position, point in enumerate(points):
        request = run_request(options, point)
        config = request.finalized()
        planned.append(PlannedRun(position, point, request, config, config_hash(config)))
    return planned


# ---- what is done, who runs what ------------------------------------------------------------------------------
def done_keys(leaderboard: Path) -> set[tuple[str, str, str]]:
    table = read_leaderboard(leaderboard)
    ok = table[table["status"] == "ok"]
    return set(zip(ok["dataset"], ok["config_hash"], ok["seed"].astype(str)))


def row_count(leaderboard: Path, key: tuple[str, str, str]) -> int:
    table = read_leaderboard(leaderboard)
    return int(((table["dataset"] == key[0]) & (table["config_hash"] == key[1]) & (table["seed"].astype(str) == key[2])).sum())


@contextmanager
def claim(leaderboard_dir: Path, planned: PlannedRun) -> Iterator[int | None]:
    """The open claim file descriptor, or None when another live process runs this point.

    The lock file is never deleted: deleting it would let a process that opened the old file and one that
    creates a new one both hold "the" claim."""
    folder = Path(leaderboard_dir) / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    dataset, digest, seed = planned.key
    descriptor = os.open(folder / f"{dataset}-{digest}-s{seed}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{socket.gethostname()} pid {os.getpid()} {planned.point.describe()}\n".encode())
        yield descriptor
    finally:
        os.close(descriptor)  # closing the last descriptor (ours and the run's) releases the claim


# ---- running one point ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # ok | failed | stopped (SIGTERM/SIGINT, not done) | done (skipped) | claimed (another sweep runs it)
    error: str = ""


def run_command(argv: Sequence[str]) -> list[str]:
    """The program of one run (a function, so tests can put a crashing program in its place)."""
    return [sys.executable, "-m", "benchmark", *argv]


def run_subprocess(argv: Sequence[str], keep_fds: Sequence[int] = (), on_start=None, own_job: bool = True) -> tuple[int, str]:
    """Run one point; stream its output through and return (exit code, the last lines of its stderr).

    ``own_job``: the run is a job of its own on this machine, so it must not take the sweep's launcher variables
    (a sweep inside an sbatch or srun allocation) for its DDP rank; Lightning then starts DEVICES ranks itself.
    A submitit task keeps them: there every task is one rank of the run."""
    env = child_processes.environment(own_job)
    # The run imports this very copy of the suite, even when another copy is installed in the environment.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = child_processes.start(run_command(argv), stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                                    pass_fds=tuple(keep_fds))
    if on_start:
        on_start(process)
    tail: deque[str] = deque(maxlen=30)

    def pump():
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = process.wait()
    reader.join()
    return code, "".join(tail)


def run_in_process(planned: PlannedRun, resume: Path | None) -> tuple[int, str]:
    from benchmark.run_command import execute
    from core.errors import EXIT_USER_ERROR

    try:
        return execute(planned.config, resume), ""
    except UserError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_USER_ERROR, " ".join(error.message.split())
    except Exception as error:  # noqa: BLE001 - a failing run must not end the sweep
        return 1, f"{type(error).__name__}: {error}"


# A run ended by SIGTERM or SIGINT: the codes it exits with itself (benchmark/stops.py), or the signal.
STOPPED_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}


def failure_reason(code: int, stderr_tail: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
    # A traceback ends with the exception; a UserError prints "error: ..." then its where/fix lines.
    cause = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "no error output")
    return f"exit code {code}: {cause}"


def failed_row(planned: PlannedRun, reason: str) -> dict[str, Any]:
    config = planned.config
    return {
        "dataset": config["dataset"], "method": config["method_name"], "profile": config["profile"],
        "labeled_cases": config["data"]["labeled"], "seed": planned.point.seed, "checkpoint": "none",
        "status": "failed", "config_hash": planned.config_hash, "ratio": planned.point.ratio,
        "host": socket.gethostname(), "error": reason[:500],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def settle(options: SweepOptions, planned: PlannedRun, rows_before: int, code: int, stderr_tail: str) -> Outcome:
    """The outcome of a finished run; a failed run that did not write its own row gets one here."""
    if code == 0:
        return Outcome("ok")
    if code in STOPPED_CODES:  # SIGTERM / SIGINT: not done, no failed row; the next sweep resumes its folder
        return Outcome("stopped", failure_reason(code, stderr_tail))
    reason = failure_reason(code, stderr_tail)
    if row_count(options.leaderboard, planned.key) == rows_before:
        append_rows(options.leaderboard, [failed_row(planned, reason)])
    return Outcome("failed", reason)


def folder_to_resume(planned: PlannedRun) -> Path | None:
    """The folder a killed run of this point left, to continue (``--resume``), if there is one. Called while
    holding the point's claim, so no other sweep runs or resumes that folder meanwhile."""
    from benchmark.run import unfinished_run_folder

    folder = unfinished_run_folder(planned.config, planned.config_hash)
    if folder is not None:
        say(f"resume {planned.point.describe()} from {folder}")
    return folder


def resumed_argv(planned: PlannedRun, folder: Path | None) -> list[str]:
    return planned.argv if folder is None else [*planned.argv, "--resume", str(folder)]


def say(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def execute_local(options: SweepOptions, planned: PlannedRun, total: int) -> Outcome:
    with claim(Path(options.leaderboard_dir), planned) as descriptor:
        if descriptor is None:
            return Outcome("claimed")
        if planned.key in done_keys(options.leaderboard):
            return Outcome("done")
        rows_before = row_count(options.leaderboard, planned.key)
        folder = folder_to_resume(planned)
        if options.in_process:
            say(f"start {planned.describe(total)} in-process")
            code, tail = run_in_process(planned, folder)
        else:
            code, tail = run_subprocess(resumed_argv(planned, folder), keep_fds=(descriptor,),
                                        on_start=lambda p: say(f"start {planned.describe(total)} pid={p.pid}"))
        return settle(options, planned, rows_before, code, tail)


# ---- submitit (SLURM, or local processes for testing the same path) ---------------------------------------------
def job_main(argv: list[str]) -> tuple[int, str]:
    """What a submitit job executes (in every task of a multi-task job: each task is one DDP rank)."""
    return run_subprocess(argv, own_job=False)


def make_executor(options: SweepOptions):
    import submitit

    folder = Path(options.out) / "submitit" / options.sweep_name()
    devices = options.devices or 1
    if options.launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=options.slurm_time_min, tasks_per_node=1, nodes=1)
        return executor
    executor = submitit.SlurmExecutor(folder=str(folder))
    additional = {}
    for text in options.slurm_params:
        if "=" not in text:
            raise UserError(f"--slurm-param {text!r} is not KEY=VALUE", fix="e.g. --slurm-param account=myproject")
        key, value = text.split("=", 1)
        additional[key.strip()] = value
    parameters = dict(
        job_name=f"ssl-bench-{options.sweep_name()}",
        time=options.slurm_time_min,
        nodes=options.num_nodes or 1,
        ntasks_per_node=devices,  # srun starts one task per device; Lightning's SLURMEnvironment makes them ranks
        gpus_per_node=options.slurm_gpus_per_node if options.slurm_gpus_per_node is not None else devices,
        setup=list(options.slurm_setup),
        additional_parameters=additional,
    )
    for key, value in (("partition", options.slurm_partition), ("cpus_per_task", options.slurm_cpus_per_task),
                       ("mem", f"{options.slurm_mem_gb}G" if options.slurm_mem_gb else None)):
        if value is not None:
            parameters[key] = value
    if not parameters["gpus_per_node"]:
        parameters.pop("gpus_per_node")
    executor.update_parameters(**parameters)
    return executor


def execute_submitit(options: SweepOptions, runs: list[PlannedRun], total: int, outcomes: dict[int, Outcome]) -> None:
    """Submit the points (at most ``slurm_max_parallel`` in flight) and collect them. The sweep process holds each
    point's claim from submission to collection; on SIGINT/SIGTERM it cancels its jobs before exiting."""
    executor = make_executor(options)
    limit = options.slurm_max_parallel or (1 if options.launcher == "submitit-local" else len(runs))
    pending = deque(runs)
    in_flight: dict[int, tuple[Any, PlannedRun, Any, int]] = {}
    claims: dict[int, Any] = {}

    def cancel_all(signum, _frame):
        for job, *_ in in_flight.values():
            job.cancel(check=False)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, cancel_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                planned = pending.popleft()
                context = claim(Path(options.leaderboard_dir), planned)
                descriptor = context.__enter__()
                if descriptor is None or planned.key in done_keys(options.leaderboard):
                    outcomes[planned.index] = Outcome("claimed" if descriptor is None else "done")
                    context.__exit__(None, None, None)
                    report(planned, outcomes[planned.index], total)
                    continue
                rows_before = row_count(options.leaderboard, planned.key)
                job = executor.submit(job_main, resumed_argv(planned, folder_to_resume(planned)))
                say(f"start {planned.describe(total)} job={job.job_id}")
                in_flight[planned.index] = (job, planned, context, rows_before)
            time.sleep(1.0 if in_flight else 0)
            for index, (job, planned, context, rows_before) in list(in_flight.items()):
                if not job.done():
                    continue
                try:
                    code, tail = job.result()
                except Exception as error:  # noqa: BLE001 - the job itself failed (timeout, node failure, ...)
                    code, tail = 1, f"submitit job {job.job_id} failed: {str(error).strip()[-400:]}"
                outcomes[index] = settle(options, planned, rows_before, code, tail)
                context.__exit__(None, None, None)
                del in_flight[index]
                report(planned, outcomes[index], total)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _job, _planned, context, _rows in in_flight.values():
            context.__exit__(None, None, None)


# ---- the sweep ------------------------------------------------------------------------------------------------
def report(planned: PlannedRun, outcome: Outcome, total: int) -> None:
    text = {"ok": "ok", "failed": "FAILED", "stopped": "STOPPED (not done: the next sweep resumes it)",
            "done": "skip (already in the leaderboard)",
            "claimed": "skip (another sweep is running it)"}[outcome.status]
    say(f"{text} {planned.describe(total)}" + (f": {outcome.error}" if outcome.error else ""))


def check_leaderboard(options: SweepOptions) -> None:
    """Damaged, unreadable or stuck-locked leaderboards stop the sweep before it trains anything."""
    done_keys(options.leaderboard)
    Path(options.leaderboard_dir).mkdir(parents=True, exist_ok=True)
    with locked(options.leaderboard):
        pass


def sweep(options: SweepOptions) -> dict[int, Outcome]:
    options = copy.deepcopy(options)
    runs = plan(options)
    check_leaderboard(options)
    total = len(runs)
    done = done_keys(options.leaderboard)
    todo = [planned for planned in runs if planned.key not in done]
    say(f"sweep {options.sweep_name()} on {options.dataset} ({options.profile} profile), shard {options.shard or '0/1'}: "
        f"{total} points, {total - len(todo)} already in {options.leaderboard}, {len(todo)} to run")
    outcomes: dict[int, Outcome] = {planned.index: Outcome("done") for planned in runs if planned.key in done}
    if options.dry_run:
        for planned in runs:
            say(f"{'done' if planned.index in outcomes else 'to run'} {planned.describe(total)}")
        return outcomes
    for planned in runs:
        if planned.index in outcomes:
            report(planned, outcomes[planned.index], total)
    if options.launcher == "local":
        for planned in todo:
            outcomes[planned.index] = execute_local(options, planned, total)
            report(planned, outcomes[planned.index], total)
    else:
        execute_submitit(options, todo, total, outcomes)
    counts = {status: sum(o.status == status for o in outcomes.values()) for status in ("ok", "failed", "stopped", "done", "claimed")}
    say(f"finished: {counts['ok']} ran ok, {counts['failed']} failed, {counts['stopped']} stopped, {counts['done']} already done, "
        f"{counts['claimed']} running in another sweep")
    return outcomes
