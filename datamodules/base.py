"""The semi-supervised DataModule every dataset family shares.

A family (ACDC, LA, ...) only says how to read its lists (``read_split``) and how to turn an item into a
training sample or a whole evaluation case. Everything else lives here once: the labeled-count convention, the
deterministic split written into the run folder, the step-indexed per-rank samplers (see samplers.py), the
global-batch-to-per-device division and the loaders for whole validation/test cases.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from core.atomic import write_text_atomically
from core.distributed import check_shareable
from core.errors import UserError
from core.spec import DatasetSpec
from datamodules.checks import Checks, check_arrays, collecting, report
from datamodules.listing import LABELED_OPTION, RATIO_OPTION, read_list, report_duplicates, resolve_labeled_count  # noqa: F401 (re-exported)
from datamodules.samplers import PartitionedStepSampler, PositionedEpoch, StepSampler


@dataclass
class ListedData:
    """What a family reads from its list files: ordered training units and the evaluation cases."""

    units: list[tuple[str, list[str]]]  # (unit id, its training items), in the list's order
    val: list[str]
    test: list[str]
    listed_units: int  # training units in the list before any validation hold-out


@dataclass
class CheckedLayout:
    """What ``check_layout`` found: the problems and notes, and the lists when they are usable."""

    checks: Checks
    listed: ListedData | None

    def raise_if_any_and_return(self) -> ListedData:
        self.checks.raise_if_any()
        assert self.listed is not None
        return self.listed


@dataclass
class Split:
    """Which items train with labels, which without, and which whole cases validate and test."""

    labeled_units: list[str]
    labeled: list[str]
    unlabeled: list[str]
    val: list[str]
    test: list[str]
    total_units: int
    unit: str
    notes: list[str] = field(default_factory=list)

    @property
    def labeled_count(self) -> int:
        return len(self.labeled_units)

    def write(self, path: Path) -> None:
        write_text_atomically(path, json.dumps(asdict(self), indent=1))


def report_foreign_files(folder: Path, suffixes: Sequence[str], what: str) -> None:
    """Files in ``folder`` that a layout reading only ``suffixes`` would skip (e.g. one tile saved as .jpg in a set of
    PNGs): a problem, not a silent omission. Hidden files (.DS_Store, editors' files) are left alone."""
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in suffixes)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        report(UserError(f"{len(foreign)} file(s) among the {what} are not {' / '.join(suffixes)} and would be skipped: {shown}",
                         where=str(folder), fix=f"convert them to {suffixes[0]} (lossless) or move them out of the folder"))


def check_files_exist(paths: Sequence[Path], list_file: Path) -> None:
    """Every file a list names must exist (all missing ones in one problem)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n    ".join(str(p) for p in missing[:5])
        more = f"\n    ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        report(UserError(
            f"{len(missing)} file(s) named in {list_file.name} are missing:\n    {shown}{more}",
            where=str(list_file),
            fix="complete the data copy (or fix the list); the layout is described in the README",
        ))


def read_h5(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read datasets from an h5 file; a corrupt file or a missing key is a UserError naming the file."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise UserError(
                    f"h5 file lacks dataset(s) {missing} (has {sorted(f.keys())})",
                    where=str(path),
                    fix="re-create the file in the dataset's published format",
                )
            return {k: f[k][()] for k in keys}
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise UserError(f"cannot read h5 file ({error})", where=str(path), fix="the file is corrupt or truncated: copy it again") from error


def check_stored_dtypes(image: np.ndarray, label: np.ndarray | None, where: str, checks: Checks,
                        image_dtype=np.float32, label_dtype=np.uint8) -> None:
    """The h5 forms of the literature store float32 images and uint8 labels (docs/datasets.md)."""
    for key, array, expected in (("image", image, image_dtype), ("label", label, label_dtype)):
        if array is not None and array.dtype != expected:
            checks.problem(
                f"'{key}' is stored as {array.dtype}, the published files have {np.dtype(expected).name}",
                where,
                f"re-save '{key}' as {np.dtype(expected).name} (the converters write the published dtypes)",
            )


class TrainItems(Dataset):
    """Training samples of one stream: ``load(item)`` gives arrays, ``transform`` augments with an explicit RNG.

    The loader's sampler (``PositionedEpoch``) hands out ``(dataset index, draw number)`` pairs; the draw number is
    the sample's place in the global stream, and the augmentation's generator is seeded by (stream seed, draw
    number). A sample's augmentation is therefore a pure function of the seed and its place, like the sample
    itself (samplers.py): the same with any number of loader workers or DDP ranks, and a run resumed at step k
    draws exactly what the uninterrupted run drew from step k on.

    With ``cache_decoded`` every item is read and decompressed once, here in the main process, before the loader
    forks its workers, which then share those pages copy-on-write (h5 gzip decoding was most of an LA batch's
    cost and competed with the training step for the same cores; ``make perf``, docs/perf.md). Transforms never
    write into their input and every sample is copied out, so the cached arrays stay as read.
    """

    def __init__(self, items: list[str], load, transform, with_label: bool, spatial_dims: int,
                 cache_decoded: bool = False, seed: int = 0):
        self.items, self.load, self.transform, self.with_label = items, load, transform, with_label
        self.spatial_dims, self.seed = spatial_dims, seed
        self.decoded = {item: load(item, with_label) for item in dict.fromkeys(items)} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, draw = key
        rng = np.random.default_rng((self.seed, draw))
        item = self.items[index]
        image, label = self.decoded[item] if self.decoded is not None else self.load(item, self.with_label)
        image, label = self.transform(rng, image, label)
        image = torch.from_numpy(np.array(image, dtype=np.float32, order="C"))
        # Single-channel items are (*spatial); multi-channel ones (*spatial, channels), as image files store them.
        image = image.unsqueeze(0) if image.ndim == self.spatial_dims else torch.movedim(image, -1, 0)
        sample = {"image": image}
        if self.with_label:
            sample["label"] = torch.from_numpy(np.array(label, dtype=np.int64, order="C"))
        return sample


class Cases(Dataset):
    """Whole cases for validation and test: {"case", "image", "label", "spacing"} as numpy arrays."""

    def __init__(self, case_ids: list[str], load_case):
        self.case_ids, self.load_case = case_ids, load_case

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load_case(self.case_ids[index])


def _as_is(sample):
    return sample


class SemiSupervisedDataModule(pl.LightningDataModule):
    """Labeled and unlabeled training streams plus whole validation/test cases, for one dataset root.

    Subclasses implement ``read_split`` (lists -> units, val and test case ids, with file checks),
    ``load_item`` (one training item as arrays), ``train_transform`` and ``load_case``.
    """

    # Keys of the config's data section that only this family reads, with their defaults (EndoVis 2017:
    # {"fold": 0, ...}). The family's preset declares the same keys, so ``--set data.<key>=...`` is type-checked
    # like any other key; ``build_datamodule`` and the verifier pass them as ``options``.
    data_options: dict[str, Any] = {}

    def __init__(
        self,
        spec: DatasetSpec,
        root: Path,
        *,
        patch_size: Sequence[int],
        labeled_batch_size: int,
        unlabeled_batch_size: int,
        max_steps: int,
        seed: int,
        ratio: float | None = None,
        labeled: int | None = None,
        use_unlabeled: bool = True,
        num_workers: int = 2,
        cache_decoded: bool = True,
        val_holdout: int = 0,
        max_eval_cases: int | None = None,
        read_lists: bool = True,
        labeled_partitions: int = 1,
        options: dict[str, Any] | None = None,
    ):
        super().__init__()
        unknown = sorted(set(options or {}) - set(self.data_options))
        if unknown:
            raise UserError(
                f"{spec.name} has no data option {', '.join(unknown)}",
                fix=f"its options: {', '.join(sorted(self.data_options)) or 'none'}",
            )
        self.options = {**self.data_options, **(options or {})}
        self.spec = spec
        self.root = Path(root)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != spec.spatial_dims:
            raise UserError(
                f"patch size {list(self.patch_size)} has {len(self.patch_size)} axes but {spec.name} is {spec.spatial_dims}D",
                fix=f"give data.patch_size with {spec.spatial_dims} values",
            )
        self.labeled_batch_size = labeled_batch_size
        self.unlabeled_batch_size = unlabeled_batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.num_workers = num_workers
        self.cache_decoded = cache_decoded
        self.val_holdout = val_holdout
        self.max_eval_cases = max_eval_cases
        self.labeled_partitions = labeled_partitions
        if not self.root.is_dir():
            raise UserError(
                f"data root for {spec.name} does not exist or is not a folder",
                where=str(self.root),
                fix="set DATA_ROOT to the dataset's top folder (see the README for the expected layout)",
            )
        if not read_lists:
            self.split = None  # the verifier reads the lists itself (datamodules/verify.py)
            return
        listed = self.check_layout().raise_if_any_and_return()
        units, val_cases, test_cases = listed.units, listed.val, listed.test
        count = resolve_labeled_count(spec, len(units), ratio, labeled, listed.listed_units)
        labeled_units, unlabeled_units = self.select_labeled(units, count)
        unlabeled_units = unlabeled_units if use_unlabeled else []
        self.split = Split(
            labeled_units=[unit for unit, _ in labeled_units],
            labeled=[item for _, items in labeled_units for item in items],
            unlabeled=[item for _, items in unlabeled_units for item in items],
            val=val_cases,
            test=test_cases,
            total_units=len(units),
            unit=spec.labeled_unit,
        )
        self.split.notes = self.split_notes(self.split)
        self.labeled_partition_sizes = self._partition_labeled(labeled_units)

    def _partition_labeled(self, labeled_units: list[tuple[str, list[str]]]) -> list[int]:
        """Item counts of the labeled partitions: consecutive, near-equal groups of whole labeled units in list
        order (a method with per-network labeled data, e.g. MMS, asks for 2). Deterministic: no shuffling."""
        parts = self.labeled_partitions
        if parts == 1:
            return [len(self.split.labeled)]
        if len(labeled_units) < parts:
            raise UserError(
                f"this method splits the labeled {self.spec.labeled_unit}s into {parts} disjoint parts, "
                f"but only {len(labeled_units)} is labeled",
                fix=f"label at least {parts} {self.spec.labeled_unit}s (LABELED={parts} or a larger RATIO)",
            )
        bounds = [round(p * len(labeled_units) / parts) for p in range(parts + 1)]
        sizes = [sum(len(items) for _, items in labeled_units[a:b]) for a, b in zip(bounds, bounds[1:])]
        self.split.notes.append(
            "labeled partitions (one per network): "
            + "; ".join(f"{b - a} {self.spec.labeled_unit}s / {n} items" for a, b, n in zip(bounds, bounds[1:], sizes))
        )
        return sizes

    # ---- what a family provides -------------------------------------------------------------------
    def read_split(self) -> ListedData:
        """Read and check the list files: ordered training units, validation and test case ids.

        Check the layout with ``read_list`` and ``check_files_exist`` (they collect every problem when the
        verifier or ``check_layout`` runs this) and raise ``UserError`` for anything else that is wrong.
        """
        raise NotImplementedError

    def load_item(self, item: str, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One training item: image (*spatial) or, with several channels, (*spatial, channels); label (*spatial)."""
        raise NotImplementedError

    def train_transform(self, rng: np.random.Generator, image, label):
        raise NotImplementedError

    def load_case(self, case_id: str) -> dict[str, Any]:
        """A whole case: {"case", "image" ((*spatial) or (channels, *spatial)), "label" (*spatial), "spacing"}."""
        raise NotImplementedError

    def select_labeled(self, units: list[tuple[str, list[str]]], count: int):
        """(labeled units, unlabeled units): by default the first ``count`` units in list order (the published
        convention of list-based sets); a family may spread them instead (EndoVis 2017: evenly over its frames)."""
        return units[:count], units[count:]

    def split_notes(self, split: Split) -> list[str]:
        """Facts about the split worth writing down with the run (split.json), e.g. CaDIS's labeled videos."""
        return []

    def leaderboard_fields(self) -> dict[str, Any]:
        """Columns a leaderboard row of this data needs beyond the shared ones (EndoVis 2017: its fold)."""
        return {}

    # ---- verification hooks (datamodules/verify.py; defaults fit most families) ------------------------
    def describe(self, kind: str, name: str) -> str:
        """Where a training item (kind "item") or a val/test case ("case") lives, for messages."""
        return f"{kind} '{name}' under {self.root}"

    def case_unit(self, case_id: str) -> str:
        """The labeled unit a val/test case belongs to (ACDC: the patient of a volume), for the leakage check."""
        return case_id

    def check_sample(self, kind: str, name: str, image: np.ndarray, label: np.ndarray | None, checks: Checks) -> None:
        """Format-specific checks of one loaded item ("item") or case ("case"), e.g. the stored dtypes. The
        verifier already checks shapes, channels, finiteness and label values against the spec."""

    # ---- what a run reads, checked ----------------------------------------------------------------------
    def check_loaded(self, kind: str, name: str, image, label, with_label: bool = True) -> None:
        """A UserError naming the file when a loaded sample would crash training or be scored wrongly (wrong
        axes, empty, NaN/inf, label shape or values): the verifier's array checks, applied to what a run reads."""
        checks = Checks()
        check_arrays(self.spec, kind, self.describe(kind, name), image, label, checks, with_label)
        checks.raise_if_any()

    def load_checked_item(self, item: str, with_label: bool):
        image, label = self.load_item(item, with_label)
        self.check_loaded("item", item, image, label, with_label)
        return image, label

    def load_checked_case(self, case_id: str) -> dict[str, Any]:
        case = self.load_case(case_id)
        self.check_loaded("case", case_id, case["image"], case["label"])
        return case

    def check_layout(self) -> "CheckedLayout":
        """The cheap checks (lists, named files exist, no case in two splits), every problem collected."""
        with collecting() as checks:
            listed = self.read_split()
            self.check_listed(listed, checks)
        return CheckedLayout(checks, listed if checks.ok else None)

    def check_listed(self, listed: ListedData, checks: Checks) -> None:
        training = {unit for unit, _ in listed.units}
        val = {self.case_unit(c) for c in listed.val}
        test = {self.case_unit(c) for c in listed.test}
        for first, second, a, b in (("training", "validation", training, val), ("training", "test", training, test),
                                    ("validation", "test", val, test)):
            shared = sorted(a & b)
            if shared:
                checks.problem(
                    f"{len(shared)} {self.spec.labeled_unit}(s) are in both the {first} and the {second} split "
                    f"(e.g. {', '.join(shared[:3])}): the test would see training data",
                    where=str(self.root),
                    fix="restore the published list files; every case belongs to exactly one split",
                )
        published = self.spec.labeled_counts.get(1.0)
        if published is not None and listed.listed_units != published:
            checks.note(
                f"the training list has {listed.listed_units} {self.spec.labeled_unit}s, the published set "
                f"{published}: a subset or a different copy, so results are not comparable with published tables"
            )

    # ---- shared machinery -------------------------------------------------------------------------
    @property
    def has_unlabeled(self) -> bool:
        return bool(self.split.unlabeled)

    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.global_step

    def per_rank_batch(self, global_batch: int, world_size: int) -> int:
        if global_batch % world_size:
            raise UserError(
                f"global batch {global_batch} cannot be split evenly over {world_size} devices",
                fix="choose DEVICES dividing the labeled and unlabeled batch sizes",
            )
        return global_batch // world_size

    def _stream(self, items: list[str], with_label: bool, global_batch: int) -> DataLoader:
        rank, world_size, start_step = self._world()
        batch = self.per_rank_batch(global_batch, world_size)
        seed = self.seed + (0 if with_label else 7919)
        if with_label and self.labeled_partitions > 1:
            if batch % self.labeled_partitions:
                raise UserError(
                    f"the labeled batch per device ({batch}) cannot be shared equally by {self.labeled_partitions} "
                    "networks that each train on their own labeled part",
                    fix=f"choose data.labeled_batch_size divisible by {self.labeled_partitions} x DEVICES",
                )
            sampler = PartitionedStepSampler(self.labeled_partition_sizes, batch, self.max_steps, seed, rank, world_size, start_step)
        else:
            sampler = StepSampler(len(items), batch, self.max_steps, seed, rank, world_size, start_step)
        dataset = TrainItems(items, self.load_checked_item, self.train_transform, with_label, self.spec.spatial_dims,
                             self.cache_decoded, seed)
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=PositionedEpoch(sampler),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self):
        streams = {"labeled": self._stream(self.split.labeled, True, self.labeled_batch_size)}
        if self.has_unlabeled:
            streams["unlabeled"] = self._stream(self.split.unlabeled, False, self.unlabeled_batch_size)
        return CombinedLoader(streams, mode="min_size")

    def cases(self, stage: str) -> Cases:
        ids = {"val": self.split.val, "test": self.split.test}[stage]
        if self.max_eval_cases:
            ids = ids[: self.max_eval_cases]
        return Cases(ids, self.load_checked_case)

    def _case_loader(self, stage: str) -> DataLoader:
        # Under DDP each rank loads and scores its own share of the cases; the method gathers the scores.
        rank, world_size, _ = self._world()
        cases = self.cases(stage)
        check_shareable(len(cases), world_size, stage)
        share = Cases(cases.case_ids[rank::world_size], cases.load_case)
        return DataLoader(share, batch_size=None, collate_fn=_as_is, num_workers=min(self.num_workers, 1))

    def val_dataloader(self):
        return self._case_loader("val")

    def test_dataloader(self):
        return self._case_loader("test")
