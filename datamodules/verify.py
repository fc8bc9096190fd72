"""The dataset verifier: ``python -m benchmark data verify DATASET ROOT``.

Two levels, both run through the dataset's own DataModule, so the verifier checks exactly what training reads:

- **cheap** (also run by every DataModule before training, ``SemiSupervisedDataModule.check_layout``): the list
  files exist and hold plain names, every file they name exists, no case is in two splits; a note when the counts
  differ from the published set.
- **deep** (``deep=True``): every training item and every val/test case is loaded with the family's loaders and
  checked against the spec: readable (a truncated h5 is a problem naming the file), numeric and finite, not
  empty, the expected number of axes and channels, image and label of the same spatial shape, integer labels
  with values in ``0 .. num_classes - 1`` (plus the spec's ignore index) (``checks.check_arrays``, which every run
  also applies to each sample it reads), and the family's format specifics (``check_sample``, e.g. ACDC stores
  float32 images in [0, 1] and uint8 labels).

A new family gets all of this by implementing the DataModule's ``read_split`` with ``read_list`` /
``check_files_exist`` and its loaders; it may add ``check_sample`` and ``case_unit``. A family with its own data
options (EndoVis 2017: fold, crop, test set) is verified with the options a run would use (``--set data.KEY=VALUE``,
defaults otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import UserError
from datamodules.base import ListedData, SemiSupervisedDataModule
from datamodules.checks import Checks, check_arrays


@dataclass
class Verification:
    dataset: str
    root: Path
    checks: Checks
    listed: ListedData | None
    samples_read: int = 0
    deep: bool = False

    @property
    def ok(self) -> bool:
        return self.checks.ok

    def summary(self) -> str:
        if self.listed is None:
            return "lists unusable"
        items = sum(len(items) for _, items in self.listed.units)
        return (f"{len(self.listed.units)} training units ({items} items), {len(self.listed.val)} validation and "
                f"{len(self.listed.test)} test cases")


def open_for_verification(dataset: str, root: str | Path, options: dict | None = None) -> SemiSupervisedDataModule:
    """The dataset's DataModule on ``root`` without reading its lists (the verifier reads them, collecting).
    ``options``: the family's data options (EndoVis 2017: fold, crop, test set); their defaults otherwise."""
    from datamodules import get_dataset

    entry = get_dataset(dataset)
    return entry.datamodule(
        entry.spec, Path(root), patch_size=entry.spec.patch_size, labeled_batch_size=1, unlabeled_batch_size=1,
        max_steps=1, seed=0, ratio=1.0, num_workers=0, read_lists=False, options=options,
    )


def verify(dataset: str, root: str | Path, deep: bool = True,
           progress: Callable[[int, int], None] | None = None, options: dict | None = None) -> Verification:
    """Check ``root`` as dataset ``dataset``; every problem is collected, nothing raises for bad data."""
    root = Path(root)
    try:
        module = open_for_verification(dataset, root, options)
    except UserError as error:  # e.g. the root does not exist
        checks = Checks()
        checks.problem(error.what, error.where, error.fix)
        return Verification(dataset, root, checks, None, deep=deep)
    layout = module.check_layout()
    result = Verification(dataset, root, layout.checks, layout.listed, deep=deep)
    if deep and layout.listed is not None:  # files are read only once the layout is whole
        result.samples_read = check_samples(module, layout.listed, layout.checks, progress)
    return result


def check_samples(module: SemiSupervisedDataModule, listed: ListedData, checks: Checks,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Load every training item and val/test case and check it; returns how many were read."""
    items = [item for _, unit_items in listed.units for item in unit_items]
    cases = list(dict.fromkeys(listed.val + listed.test))
    total = len(items) + len(cases)
    content = ContentTally(ignore=-1 if module.spec.ignore_index is None else module.spec.ignore_index)
    for index, (kind, name) in enumerate([("item", i) for i in items] + [("case", c) for c in cases]):
        try:
            if kind == "item":
                image, label = module.load_item(name, True)
            else:
                case = module.load_case(name)
                image, label = np.asarray(case["image"]), np.asarray(case["label"])
        except UserError as error:
            checks.problem(error.what, error.where, error.fix)
        else:
            if check_arrays(module.spec, kind, module.describe(kind, name), image, label, checks):
                module.check_sample(kind, name, image, label, checks)
                content.add(name, image, label, test=kind == "case" and name in listed.test)
        if progress is not None:
            progress(index + 1, total)
    content.warn(module, checks)
    return total


@dataclass
class ContentTally:
    """What the checked samples hold, for warnings no single file shows: every image constant (e.g. all zero: a
    failed export), or no foreground in any test label (every score would be the empty-mask rule's)."""

    images: int = 0
    constant_images: list[str] = field(default_factory=list)
    test_labels: int = 0
    test_with_foreground: int = 0
    ignore: int = -1  # the spec's ignore index: not foreground

    def add(self, name: str, image, label, test: bool) -> None:
        image = np.asarray(image)
        self.images += 1
        if image.size and image.min() == image.max():
            self.constant_images.append(name)
        if test and label is not None:
            self.test_labels += 1
            self.test_with_foreground += bool(np.any((np.asarray(label) > 0) & (np.asarray(label) != self.ignore)))

    def warn(self, module: SemiSupervisedDataModule, checks: Checks) -> None:
        if self.images and len(self.constant_images) == self.images:
            checks.warn(f"every one of the {self.images} images read is constant (e.g. all zero): nothing to learn from; "
                        "check the export or conversion of the images")
        elif self.constant_images:
            checks.note(f"{len(self.constant_images)} of {self.images} images are constant (e.g. {self.constant_images[0]})")
        if self.test_labels and not self.test_with_foreground:
            checks.warn(f"none of the {self.test_labels} test labels holds foreground (every voxel background): every "
                        "test score would come from the empty-mask rule; check the test labels")


def format_report(result: Verification, max_problems: int = 20) -> str:
    """What the CLI prints: every problem with where and how to fix it, then the notes and a verdict."""
    lines = [f"verifying {result.dataset} at {result.root} ({'deep: every file read' if result.deep else 'layout only'})"]
    if result.listed is not None:
        lines.append(f"  lists: {result.summary()}")
    if result.deep and result.samples_read:
        lines.append(f"  read and checked: {result.samples_read} items and cases")
    elif result.deep and not result.ok:
        lines.append("  deep checks skipped until the layout problems are fixed")
    problems = result.checks.problems
    for index, problem in enumerate(problems[:max_problems], start=1):
        lines.append(f"PROBLEM {index}: " + problem.message.replace("\n", "\n  "))
    if len(problems) > max_problems:
        lines.append(f"... and {len(problems) - max_problems} more problems (--all prints them)")
    for warning in result.checks.warnings:
        lines.append(f"WARNING: {warning}")
    for note in result.checks.notes:
        lines.append(f"note: {note}")
    warned = f" ({len(result.checks.warnings)} warning(s) above)" if result.checks.warnings else ""
    lines.append(f"OK: no problems found{warned}" if result.ok else f"FAILED: {len(problems)} problem(s)")
    return "\n".join(lines)
