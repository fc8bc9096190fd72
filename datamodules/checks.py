"""Collecting data-layout problems instead of stopping at the first one.

The array checks every loaded sample gets (``check_arrays``: shape, channels, finiteness, label values) live here
too: the verifier applies them to every file, and the DataModule to every sample a run reads.

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
from typing import TYPE_CHECKING, Iterator

import numpy as np

from core.errors import UserError

if TYPE_CHECKING:
    from core.spec import DatasetSpec


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
    # Readable but suspicious data (every image blank, no foreground in the test labels): printed, exit 0.
    warnings: list[str] = field(default_factory=list)

    def problem(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.problems.append(Problem(what, None if where is None else str(where), fix))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

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


ARRAY_FIX = "re-create the file in the dataset's published format (or convert the raw data: `python -m benchmark data convert`)"


def check_arrays(spec: "DatasetSpec", kind: str, where: str, image, label, checks: Checks, with_label: bool = True) -> bool:
    """Shape, channel, emptiness, finiteness and label-value checks of one loaded sample; returns whether it is usable.

    ``kind`` "item" is a training item ((*spatial) or (*spatial, channels)); "case" a whole evaluation case
    ((*spatial) or (channels, *spatial); a slice-wise evaluated case is a volume of slices). ``with_label=False``:
    an unlabeled training item, whose label is not read. Cheap enough for every sample a run reads (min/max,
    not a sort, for the label values)."""
    spatial = 3 if kind == "case" and spec.eval_mode == "slicewise" else spec.spatial_dims
    multi = spec.in_channels > 1
    layout = ("(*spatial, channels)" if kind == "item" else "(channels, *spatial)") if multi else "(*spatial)"
    image, label = np.asarray(image), None if label is None else np.asarray(label)
    before = len(checks.problems)
    if image.ndim != spatial + multi or (multi and image.shape[-1 if kind == "item" else 0] != spec.in_channels):
        checks.problem(
            f"the image has shape {image.shape}; {spec.name} expects {spatial} spatial axes"
            + (f" and {spec.in_channels} channels, {layout}" if multi else "")
            + (f" (a {image.ndim - multi}-D file given to a {spatial}-D dataset?)" if image.ndim - multi != spatial else ""),
            where, ARRAY_FIX)
        return False
    spatial_shape = (image.shape[:-1] if kind == "item" else image.shape[1:]) if multi else image.shape
    if 0 in spatial_shape:
        checks.problem(f"the image is empty (shape {image.shape})", where, ARRAY_FIX)
        return False
    if not np.issubdtype(image.dtype, np.number):
        checks.problem(f"the image is not numeric (dtype {image.dtype})", where, ARRAY_FIX)
    elif not np.isfinite(image).all():
        bad = ~np.isfinite(image)
        checks.problem(f"the image holds {int(bad.sum())} NaN or infinite value(s) (first at index "
                       f"{tuple(int(i) for i in np.argwhere(bad)[0])})", where, ARRAY_FIX)
    if not with_label:
        return len(checks.problems) == before
    if label is None:
        checks.problem("no label was loaded", where, ARRAY_FIX)
        return False
    if label.shape != spatial_shape:
        checks.problem(f"image and label shapes differ: image {image.shape}, label {label.shape}", where, ARRAY_FIX)
        return False
    if not np.issubdtype(label.dtype, np.integer):
        checks.problem(f"the label has dtype {label.dtype}; labels are whole class numbers", where, ARRAY_FIX)
        return len(checks.problems) == before
    classes = spec.num_classes
    if label.min() < 0 or label.max() >= classes:
        outside = label[(label < 0) | (label >= classes)]
        allowed = {spec.ignore_index} if spec.ignore_index is not None else set()
        bad = sorted({int(v) for v in np.unique(outside)} - allowed)
        if bad:
            checks.problem(
                f"the label has values {bad} outside the {classes} classes 0..{classes - 1}"
                + (f" (and ignore {spec.ignore_index})" if spec.ignore_index is not None else ""),
                where, "check that this is the right dataset name for the folder, or re-create the label file")
    return len(checks.problems) == before
