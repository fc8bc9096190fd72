"""Where a study lives, how its workers take trials from the budget one at a time, and how a killed worker's
trial is found.

| ``--storage`` / ``STORAGE=`` | for | |
| --- | --- | --- |
| (empty) or ``sqlite`` | one worker | ``<study folder>/study.db`` |
| ``journal`` | several workers on one machine (the default for ``WORKERS>1``) | ``<study folder>/journal.log`` |
| ``sqlite:///PATH`` / ``journal:PATH`` | the same, elsewhere | |
| ``postgresql://USER[:PASSWORD]@HOST:PORT/DB`` | workers on several machines | needs ``psycopg2-binary`` |

SQLite is not meant for concurrent writers (Optuna's FAQ), and journal files rely on file locks that NFS may not
honour, so workers on several machines share a PostgreSQL database (docs/design.md#tuning).

Killed workers: a worker records a heartbeat of its running trial every ``heartbeat_interval`` seconds; a running
trial whose heartbeat is older than ``grace_period`` is failed by the next worker that looks, and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues a copy with the same parameters (retried at most ``max_retry`` times).
For the RDB storages (sqlite, PostgreSQL) this is Optuna's own heartbeat; Optuna 5 has none for journal storage,
so there the heartbeat is a trial system attribute and :meth:`Liveness.fail_stale_trials` does the same.
"""
from __future__ import annotations

import contextlib
import fcntl
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from core.errors import UserError

HEARTBEAT_ATTR = "ssl_bench_heartbeat"  # unix time of the last heartbeat (journal storage only)
# Set by RetryHeartbeatStaleTrialCallback on the copy of a failed trial (its `retried_trial_number`).
RETRIED_FROM_ATTR = "failed_trial"
FORMS = ("sqlite", "journal", "sqlite:///PATH", "journal:PATH", "postgresql://USER@HOST:PORT/DATABASE")


@dataclass(frozen=True)
class StorageSpec:
    kind: str   # sqlite | journal | postgresql
    target: str  # sqlite/postgresql: the SQLAlchemy URL; journal: the file path

    @classmethod
    def parse(cls, text: str | None, study_dir: Path | None, workers: int = 1) -> "StorageSpec":
        """``text`` as given by the user; the keywords (and nothing) put the file into ``study_dir``."""
        text = (text or "").strip()
        if text in ("", "sqlite", "journal"):
            if study_dir is None:
                raise UserError(f"storage '{text}' needs a study folder", fix="give the full URL, e.g. sqlite:///runs/tune/NAME/study.db")
            kind = text or ("journal" if workers > 1 else "sqlite")
            if kind == "sqlite":
                return cls("sqlite", f"sqlite:///{(study_dir / 'study.db').resolve()}")
            return cls("journal", str((study_dir / "journal.log").resolve()))
        if text.startswith("journal:"):
            path = text[len("journal:"):]
            path = path[2:] if path.startswith("//") else path
            if not path:
                raise _bad_url(text, "the journal file path is missing")
            return cls("journal", str(Path(path).resolve()))
        scheme = text.split(":", 1)[0].lower() if ":" in text else ""
        if scheme == "sqlite":
            if not text.startswith("sqlite:///") or text == "sqlite:///":
                raise _bad_url(text, "an sqlite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db")
            return cls("sqlite", text)
        if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
            parts = urlsplit(text)
            if not parts.hostname or not parts.path.strip("/"):
                raise _bad_url(text, "a PostgreSQL URL names the host and the database")
            return cls("postgresql", urlunsplit(("postgresql+psycopg2", *parts[1:])))
        raise _bad_url(text, "unknown storage")

    def display(self) -> str:
        """The storage without its password (for summaries, logs and study.json)."""
        if self.kind != "postgresql":
            return self.target if self.kind == "sqlite" else f"journal:{self.target}"
        parts = urlsplit(self.target)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(("postgresql", netloc, *parts[2:]))

    def open(self, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int | None = None):
        """The Optuna storage; with ``heartbeat_interval`` stale trials are failed and retried."""
        callback = None
        if heartbeat_interval is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        if self.kind == "journal":
            path = Path(self.target)
            if not path.parent.is_dir():
                raise UserError("the folder of the journal file does not exist", where=str(path), fix="create it or use another path")
            return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_interval, grace_period, callback)
        if self.kind == "sqlite":
            folder = Path(self.target[len("sqlite:///"):]).parent
            if not folder.is_dir():
                raise UserError("the folder of the sqlite file does not exist", where=self.target, fix="create it or use another path")
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True} if self.kind == "postgresql" else {}
        try:
            return RDBStorage(
                self.target, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=callback,
            )
        except ImportError as error:
            raise UserError(f"PostgreSQL storage needs the psycopg2 driver ({error})", where=self.display(),
                            fix="pip install psycopg2-binary (or pip install -e '.[postgres]')") from error
        except Exception as error:  # SQLAlchemy's OperationalError, ArgumentError, ...
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot open the study storage: {first_line}", where=self.display(),
                            fix="check the URL, that the server runs and accepts this user; forms: " + ", ".join(FORMS)) from error

    @contextlib.contextmanager
    def budget_lock(self, study_name: str) -> Iterator[None]:
        """Held while a worker counts the trials and takes one, so that N workers never start more than the
        budget: a file lock next to a local storage, an advisory lock of the PostgreSQL server otherwise."""
        if self.kind == "postgresql":
            import sqlalchemy

            key = zlib.crc32(f"ssl-bench-tune:{study_name}".encode())
            engine = sqlalchemy.create_engine(self.target, poolclass=sqlalchemy.pool.NullPool, connect_args={"connect_timeout": 10})
            try:
                with engine.connect() as connection:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                    try:
                        yield
                    finally:
                        connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            finally:
                engine.dispose()
            return
        path = Path(self.target if self.kind == "journal" else self.target[len("sqlite:///"):])
        with open(path.with_name(path.name + ".budget.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _bad_url(text: str, problem: str) -> UserError:
    return UserError(f"bad study storage '{text}': {problem}", where="--storage / STORAGE=", fix="one of: " + ", ".join(FORMS))


class HeartbeatJournalStorage(JournalStorage):
    """A journal storage with the heartbeat contract of Optuna's RDB storage (Optuna 5 has none for journals)."""

    def __init__(self, backend, heartbeat_interval: int | None, grace_period: int | None, stale_trial_callback) -> None:
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period, self.stale_trial_callback = heartbeat_interval, grace_period, stale_trial_callback

    def record_trial_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 0)
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            # A retried copy inherits its original's attributes: a beat from before this start is not its own.
            if beat is None or (trial.datetime_start is not None and beat < trial.datetime_start.timestamp() - 1):
                continue
            if now - beat > grace:
                stale.append(trial._trial_id)
        return stale


class Liveness:
    """Heartbeats of a worker's running trial and the failing of other workers' stale ones, for every storage."""

    def __init__(self, storage) -> None:
        self.storage = storage

    @property
    def enabled(self) -> bool:
        interval = getattr(self.storage, "heartbeat_interval", None)
        return interval is not None

    @property
    def interval(self) -> float:
        return float(self.storage.heartbeat_interval)

    def beat(self, trial_id: int) -> None:
        if not self.enabled:
            return
        if isinstance(self.storage, HeartbeatJournalStorage):
            self.storage.record_trial_heartbeat(trial_id)
        else:
            self.storage.record_heartbeat(trial_id)

    def fail_stale_trials(self, study: optuna.Study) -> None:
        if not self.enabled:
            return
        if not isinstance(self.storage, HeartbeatJournalStorage):
            optuna.storages.fail_stale_trials(study)
            return
        for trial_id in self.storage.stale_trial_ids(study._study_id):
            try:
                failed = self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
            if failed and self.storage.stale_trial_callback is not None:
                self.storage.stale_trial_callback(study, self.storage.get_trial(trial_id))
