"""User-facing errors: one clear message (what, where, how to fix) and a non-zero exit.

Every problem a user can cause by the data, the command line or the environment is raised as a
:class:`UserError`. The CLI prints it without a traceback and exits with :data:`EXIT_USER_ERROR`;
anything else is a bug in the suite and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 3  # the run itself failed (diverged); it is recorded as a failed leaderboard row


class UserError(Exception):
    """A problem the user can fix. ``what`` happened, ``where`` (a path or a value), ``fix`` says how."""

    def __init__(self, what: str | None = None, where: str | None = None, fix: str | None = None, *, message: str | None = None):
        if message is not None:  # re-raised from a DataLoader worker: recover the original what / where / fix
            what, where, fix = _parse_worker_message(message)
        self.what, self.where, self.fix = what or "", where, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


def _parse_worker_message(text: str) -> tuple[str, str | None, str | None]:
    """What / where / fix from the text torch's DataLoader re-raises a worker's exception with.

    A worker sends only the exception type and its formatted traceback; the main process then calls
    ``UserError(message="Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...\\n
    core.errors.UserError: <our message>")`` (torch calls exception types that have a ``message`` attribute
    that way, ``torch._utils.ExceptionWrapper.reraise``). Our message is what follows the last
    ``UserError: `` line; its ``where:`` / ``fix:`` lines are split off again."""
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    original = text.rpartition(marker)[2] if marker in text else text
    what, where, fix = [], None, None
    for line in original.strip("\n").split("\n"):
        if line.startswith("  where: "):
            where = line[len("  where: "):]
        elif line.startswith("  fix:   "):
            fix = line[len("  fix:   "):]
        else:
            what.append(line)
    return "\n".join(what), where, fix


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf during training; the message names the terms and the step."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UserError:
    """An unknown method/dataset/profile name, with the closest known names suggested."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(
        f"unknown {kind} '{name}'",
        where=f"known {kind}s: {', '.join(known)}",
        fix=f"{hint}`python -m benchmark list {kind}s` prints them all",
    )
