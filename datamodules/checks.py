"""Collecting data-layout problems instead of stopping at the first one.

A family's ``read_split`` checks its layout with :func:`datamodules.base.read_list` and
:func:`datamodules.base.check_files_exist` (and may raise :class:`UserError` for anything else). Outside a
collection those raise at the first problem, which is what a one-off script wants. Inside ``with collecting() as
checks:`` they record the problem in ``checks`` and carry on with what is there, so one pass reports every missing
list and file. The DataModule runs its ``read_split`` this way before training (and raises all problems at once),
and the verifier (datamodules/verify.py) does the same and then reads every listed file.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

from benchmark.errors import UserError


@dataclass(frozen=True)
class Problem:
    what: str
    where: str | None = None
    fix: str | None = None

    @classmethod
    def from_error(cls, error: UserError) -> "Problem":
        return cls(error.what, error.where, error.fix)

    def as_error(self) -> UserError:
        return UserError(self.what, self.where, self.fix)

    @property
    def message(self) -> str:
        return self.as_error().message


@dataclass
class Checks:
    """Problems (the data is unusable or wrong: non-zero exit) and notes (worth knowing, e.g. counts that differ
    from the published set)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.problems.append(Problem(what, None if where is None else str(where), fix))

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_any(self) -> None:
        """One UserError holding every problem (the first one's fix, then the others in full)."""
        if not self.problems:
            return
        if len(self.problems) == 1:
            raise self.problems[0].as_error()
        first, rest = self.problems[0], self.problems[1:]
        others = "\n".join(f"  ({i}) " + p.message.replace("\n", "\n      ") for i, p in enumerate(rest, start=2))
        raise UserError(
            f"{len(self.problems)} problems with the data; (1) {first.what}\n{others}",
            where=first.where,
            fix=(first.fix or "") + " (`python -m benchmark data verify DATASET ROOT` lists every problem)",
        )


_ACTIVE: contextvars.ContextVar[Checks | None] = contextvars.ContextVar("data_checks", default=None)


def active_checks() -> Checks | None:
    """The collection in progress, or None (then the helpers raise)."""
    return _ACTIVE.get()


def report(error: UserError) -> None:
    """Record ``error`` in the active collection, or raise it when nothing collects."""
    checks = _ACTIVE.get()
    if checks is None:
        raise error
    checks.problems.append(Problem.from_error(error))


@contextlib.contextmanager
def collecting(checks: Checks | None = None) -> Iterator[Checks]:
    """Collect problems from the helpers in the block; a UserError escaping the block is recorded too."""
    checks = checks if checks is not None else Checks()
    token = _ACTIVE.set(checks)
    try:
        yield checks
    except UserError as error:
        checks.problems.append(Problem.from_error(error))
    finally:
        _ACTIVE.reset(token)
