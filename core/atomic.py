"""Files that are replaced in one step: a process killed at any moment leaves the old file or the new one, never a part.

Every file a run or a sweep writes that something later reads back (leaderboard CSVs, checkpoints, result.json,
config.yaml, split.json) goes through :func:`replaced_atomically`: the content is written to a temporary file in
the same folder (a rename is atomic only within one file system; Lightning's own "atomic" save writes to the
system temp folder and moves the file, which copies when that folder is on another disk), flushed, fsynced and
renamed over the target. A kill leaves at most a stale ``.<name>.*.tmp`` beside the target, which the next writer
that holds the folder (the leaderboard lock, the run folder lock) removes with :func:`remove_stale_temporaries`.

The new file keeps the permissions of the file it replaces; a new file gets those of a plain ``open`` under the
process's umask (``mkstemp`` alone would make every file 0600).

A write that fails for a reason the user can fix (a full disk, a read-only folder) is a :class:`UserError` naming
the file; the target is then unchanged.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from core.errors import UserError

TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextmanager
def replaced_atomically(path: Path | str, mode: str = "w") -> Iterator[IO]:
    """A file object (``mode`` "w" or "wb") whose content replaces ``path`` when the block ends without error."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=TEMPORARY_SUFFIX)
        os.fchmod(handle, _mode_for(path))  # mkstemp creates 0600 whatever the umask
        with os.fdopen(handle, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise UserError(
            f"cannot write {path.name} ({error.strerror or error}); the file is unchanged",
            where=str(path),
            fix="free disk space or make the folder writable, then run again",
        ) from error
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def _mode_for(path: Path) -> int:
    """The permissions the replacing file gets: the replaced file's, or those a plain ``open`` would give a new
    file (0666 less the umask), so a shared leaderboard stays readable by the group that could read it."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomically(path: Path | str, text: str) -> None:
    with replaced_atomically(path, "w") as out:
        out.write(text)


def remove_stale_temporaries(folder: Path | str, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Delete the temporary files killed writers left in ``folder`` (of the file ``name`` only, if given).

    Call it only while holding what serialises the writers of that folder; returns what was removed."""
    folder = Path(folder)
    pattern = f".{name}.*{TEMPORARY_SUFFIX}" if name else f".*{TEMPORARY_SUFFIX}"
    stale = list(folder.rglob(pattern) if recursive else folder.glob(pattern))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_full_disk(error: BaseException | None) -> bool:
    """``error`` or one it was raised from/during is a full disk or an exceeded quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def full_disk_error(folder: Path | str, needed_bytes: int) -> UserError:
    """The message for a run folder whose disk filled up: how much is free and about how much is needed."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = 0
    megabytes = lambda count: f"{count / 2**20:,.0f} MB"  # noqa: E731
    return UserError(
        f"the disk holding the run folder is full ({megabytes(free)} free); the run needs about "
        f"{megabytes(needed_bytes)} more there (a checkpoint is written beside the one it replaces)",
        where=str(folder),
        fix=f"free at least {megabytes(max(needed_bytes - free, needed_bytes // 2))} on that disk (or quota), or give OUT= on another disk",
    )
