"""A data set's training units counted from its lists and folders alone: no images read, no Lightning or torch
imported (``run --show-config`` and sweep planning finalize a config with it, benchmark/finalize.py).

Each family's DataModule reads the same lists with every check (``read_split``); the constants and list readers
they share live here, and tests/test_finalize.py checks that both count the same units for every family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from core.errors import UserError
from core.spec import DatasetSpec
from datamodules.checks import report

RATIO_OPTION, LABELED_OPTION = "RATIO= (--ratio, data.ratio)", "LABELED= (--labeled, data.labeled)"


def resolve_labeled_count(
    spec: DatasetSpec, total_units: int, ratio: float | None, labeled: int | None, listed_units: int | None = None
) -> int:
    """Number of labeled units from LABELED=N or RATIO=r, following the dataset's published convention.

    RATIO maps to the conventional count (ACDC 0.1 -> 7 patients, LA 0.2 -> 16 scans) when the training list has
    its published length (``listed_units``, counted before any validation hold-out); otherwise (other ratios,
    fixtures, synthetic data) to round(r * units). RATIO=1.0 is every available unit (full supervision).
    ``spec`` is read for its ``name``, ``labeled_unit`` and ``labeled_counts`` only (a DatasetSpec, or a description
    of one).
    """
    if labeled is not None:
        if isinstance(labeled, bool) or not isinstance(labeled, int):
            raise UserError(f"LABELED must be a whole number, got {labeled!r}", where=LABELED_OPTION, fix="e.g. LABELED=7")
        if not 1 <= labeled <= total_units:
            raise UserError(
                f"LABELED={labeled} is impossible for {spec.name}: it has {total_units} training {spec.labeled_unit}s",
                where=LABELED_OPTION, fix=f"choose 1 <= LABELED <= {total_units}",
            )
        return labeled
    if ratio is None:
        raise UserError("neither RATIO nor LABELED was given", where=f"{RATIO_OPTION}, {LABELED_OPTION}", fix="e.g. RATIO=0.1 or LABELED=7")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"RATIO must be a number in (0, 1], got {ratio!r}", where=RATIO_OPTION,
                        fix="e.g. RATIO=0.1; 1.0 is full supervision")
    ratio = float(ratio)
    if ratio == 1.0:
        return total_units
    published_total = spec.labeled_counts.get(1.0)
    listed = total_units if listed_units is None else listed_units
    if listed == published_total and ratio in spec.labeled_counts:
        return min(spec.labeled_counts[ratio], total_units)
    return max(1, round(ratio * total_units))


def read_list(path: Path, what: str) -> list[str]:
    """Lines of a list file: CRLF tolerated, blank lines dropped, names checked to stay inside the data root.

    Inside ``collecting()`` (datamodules/checks.py) a missing or empty list and bad names are recorded and the
    usable names returned; otherwise the first problem raises.
    """
    if not path.is_file():
        report(UserError(f"missing {what} list file", where=str(path), fix="check DATA_ROOT points at the dataset's top folder"))
        return []
    # utf-8-sig: a byte-order mark (Windows editors) would otherwise become part of the first name.
    numbered = [(number, line.strip()) for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
                if line.strip()]
    names = [name for _, name in numbered]
    report_duplicates(numbered, path)
    bad = [name for name in names if "/" in name or "\\" in name or name.startswith(".")]
    for name in bad:
        report(UserError(
            f"list entry '{name}' is not a plain case name (paths are not allowed in list files)",
            where=str(path),
            fix="list files hold case names only, e.g. patient001_frame01",
        ))
    if not names:
        report(UserError(f"the {what} list is empty", where=str(path), fix="restore the list file from the dataset"))
    return [name for name in names if name not in bad]


def report_duplicates(numbered: Sequence[tuple[int, str]], path: Path) -> None:
    """A name listed twice would be trained or scored twice (and counted twice as labeled): refused, with the lines."""
    lines: dict[str, list[int]] = {}
    for number, name in numbered:
        lines.setdefault(name, []).append(number)
    repeated = {name: numbers for name, numbers in lines.items() if len(numbers) > 1}
    if repeated:
        shown = "; ".join(f"{name} on lines {', '.join(map(str, numbers))}" for name, numbers in list(repeated.items())[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        report(UserError(f"{len(repeated)} name(s) listed more than once: {shown}{more}", where=str(path),
                         fix="keep each name once (a repeated name would count twice)"))


# ---- what the families share with their counters ----------------------------------------------------------------
def patient_of(slice_name: str) -> str:
    """ACDC: the patient of a slice or volume name (patientNNN_frameFF[_slice_S])."""
    return slice_name.split("_")[0]


LA_DATA_FOLDER = "2018LA_Seg_Training Set"


def la_lists_folder(root: Path) -> Path:
    """Where LA's train.list and test.list are: the root, the data folder or lists/."""
    for folder in (root, root / LA_DATA_FOLDER, root / "lists"):
        if (folder / "train.list").is_file():
            return folder
    raise UserError(
        "no train.list found for LA",
        where=f"{root}, {root / LA_DATA_FOLDER}, {root / 'lists'}",
        fix=f"DATA_ROOT must contain '{LA_DATA_FOLDER}/' and train.list/test.list (at the root, in the data folder or in lists/)",
    )


def check_val_holdout(val_holdout: int, listed: int, what: str) -> int:
    """The training units left after the last ``val_holdout`` of ``listed`` validate (LA, DSB 2018)."""
    if not 0 <= val_holdout < listed:
        raise UserError(f"data.val_holdout={val_holdout} leaves no training {what} ({listed} listed)",
                        fix="choose a smaller data.val_holdout")
    return listed - val_holdout


CADIS_TRAIN_VIDEOS = (1, 3, 4, 6, 8, 9, 10, 11, 13, 14, 15, 17, 18, 19, 20, 21, 23, 24, 25)
CADIS_VAL_VIDEOS = (5, 7, 16)
CADIS_TEST_VIDEOS = (2, 12, 22)


def cadis_video_folder(number: int) -> str:
    return f"Video{number:02d}"


def png_stems(folder: Path) -> list[str]:
    """The names of a folder's frames (CaDIS videos, EndoVis sequences): its ``*.png`` files, sorted."""
    return sorted(p.stem for p in folder.glob("*.png"))


NUCLEI_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MONUSEG_SPLITS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
DSB_FOLDER = "stage1_train"
DSB_TRAIN_FRACTION = 0.8


def monuseg_tiles(images: Path) -> list[Path]:
    """A MoNuSeg split's image tiles (``img/``), sorted."""
    return sorted(p for p in images.iterdir() if p.suffix.lower() in NUCLEI_IMAGE_SUFFIXES)


def dsb_images_folder(root: Path) -> Path:
    return root / DSB_FOLDER if (root / DSB_FOLDER).is_dir() else root


def dsb_image_ids(folder: Path) -> list[str]:
    """The DSB 2018 image ids (folders holding images/), sorted; the first DSB_TRAIN_FRACTION of them train."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "images").is_dir())


DEFAULT_VAL_FRACTION = 0.1


def validation_holdout_count(listed: int, val_holdout: int, fraction: Any, unit: str, source: Path) -> int:
    """How many of ``listed`` training units validate in a set without a validation split: ``data.val_holdout``
    when it is > 0, else round(``data.val_fraction`` x listed), at least one; at least one must train."""
    if val_holdout:
        count = val_holdout
    elif isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be a number in (0, 1), got {fraction!r}", fix="e.g. data.val_fraction=0.1")
    else:
        count = max(1, round(fraction * listed))
    if not 0 < count < listed:
        raise UserError(f"cannot hold out {count} of the {listed} training {unit}s for validation: "
                        "at least one must validate and one train", where=str(source),
                        fix="choose data.val_holdout (a count) or data.val_fraction (a share) accordingly")
    return count


ENDOVIS_TRAIN_SEQUENCES = tuple(range(1, 9))
# ternaus/robot-surgery-segmentation prepare_train_val.py: fold -> the training sequences it tests on.
ENDOVIS_FOLDS = {0: (1, 3), 1: (2, 5), 2: (4, 8), 3: (6, 7)}
# Released after the challenge; two surgeries absent from the training download.
ENDOVIS_RELEASED_TEST_SEQUENCES = (9, 10)
ENDOVIS_TEST_SETS = ("fold", "released")


def endovis_sequence_folder(number: int) -> str:
    return f"instrument_dataset_{number}"


def endovis_sequence_roles(fold: Any, test_set: Any) -> dict[str, list[tuple[str, int]]]:
    """{"train" | "val" | "test": [(download split folder, sequence number), ...]} from the data options."""
    if test_set not in ENDOVIS_TEST_SETS:
        raise UserError(f"data.test_set must be one of {', '.join(ENDOVIS_TEST_SETS)}, got {test_set!r}",
                        fix="data.test_set=fold (4-fold CV on the training sequences) or released (sequences 9 and 10)")
    if test_set == "released":
        test = [("test", n) for n in ENDOVIS_RELEASED_TEST_SEQUENCES]
        rest = list(ENDOVIS_TRAIN_SEQUENCES)
    else:
        if isinstance(fold, bool) or fold not in ENDOVIS_FOLDS:
            raise UserError(f"data.fold must be one of {sorted(ENDOVIS_FOLDS)}, got {fold!r}",
                            fix="the 4 folds of the 8 training sequences: data.fold=0 .. 3")
        test = [("train", n) for n in ENDOVIS_FOLDS[fold]]
        rest = [n for n in ENDOVIS_TRAIN_SEQUENCES if n not in ENDOVIS_FOLDS[fold]]
    return {"train": [("train", n) for n in rest[:-1]], "val": [("train", rest[-1])], "test": test}


FOLDER_IMAGE, FOLDER_MASK = "image", "mask"
FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ---- the counters: (training units after any validation hold-out, units the training list holds) ------------------
def image_mask_stems(folder: Path) -> set[str]:
    """The names of the images (or masks) of an image/mask folder pair (ART-Net, RoboTool)."""
    return {p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES} if folder.is_dir() else set()


def _acdc(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    patients = {patient_of(name) for name in read_list(root / "train_slices.list", "training slices")}
    return len(patients), len(patients)


def _la(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    listed = len(read_list(la_lists_folder(root) / "train.list", "training"))
    return check_val_holdout(val_holdout, listed, "cases"), listed


def _brats(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    listed = len(read_list(root / "train.txt", "training"))
    return listed, listed


def _cadis(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    listed = sum(len(png_stems(root / cadis_video_folder(n) / "Images")) for n in CADIS_TRAIN_VIDEOS)
    return listed, listed


def _monuseg(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    images = root / MONUSEG_SPLITS["train"] / "img"
    listed = len(monuseg_tiles(images)) if images.is_dir() else 0
    return listed, listed


def _dsb2018(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    ids = dsb_image_ids(dsb_images_folder(root))
    if len(ids) < 2:  # the DataModule reports this layout with its own message
        return 0, 0
    listed = int(len(ids) * DSB_TRAIN_FRACTION)
    return check_val_holdout(val_holdout, listed, "images"), listed


def _kvasir(root: Path, options: dict, val_holdout: int, validation_list_optional: bool = False) -> tuple[int, int]:
    listed = len(read_list(root / "train.txt", "train"))
    if validation_list_optional and not (root / "val.txt").exists() and listed:
        fraction = options.get("val_fraction", DEFAULT_VAL_FRACTION)
        return listed - validation_holdout_count(listed, val_holdout, fraction, "image", root / "train.txt"), listed
    return listed, listed


def _kvasir_instrument(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    return _kvasir(root, options, val_holdout, validation_list_optional=True)


def _endovis17(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    roles = endovis_sequence_roles(options["fold"], options["test_set"])
    listed = sum(len(png_stems(root / split / endovis_sequence_folder(n) / "left_frames")) for split, n in roles["train"])
    return listed, listed


def _image_mask_folders(root: Path, options: dict, val_holdout: int) -> tuple[int, int]:
    stems = [image_mask_stems(root / "train" / kind) for kind in (FOLDER_IMAGE, FOLDER_MASK)]
    listed = len(stems[0] & stems[1])
    if not listed:
        return 0, 0
    fraction = options.get("val_fraction", DEFAULT_VAL_FRACTION)
    return listed - validation_holdout_count(listed, val_holdout, fraction, "image", root / "train" / FOLDER_IMAGE), listed


# Keyed by the DataModule class of the family (the registry's entry names it; tests check every entry has one).
UNIT_COUNTERS: dict[str, Callable[[Path, dict, int], tuple[int, int]]] = {
    "ACDCDataModule": _acdc, "LADataModule": _la, "BraTSDataModule": _brats, "CaDISDataModule": _cadis,
    "MoNuSegDataModule": _monuseg, "DSB2018DataModule": _dsb2018, "KvasirDataModule": _kvasir,
    "KvasirInstrumentDataModule": _kvasir_instrument, "EndoVis17DataModule": _endovis17,
    "ImageMaskFoldersDataModule": _image_mask_folders,
}


def count_training_units(datamodule: str, root: Path, options: dict[str, Any], val_holdout: int) -> tuple[int, int]:
    """(training units after any validation hold-out, units in the training list) of the data at ``root`` as the
    DataModule class named ``datamodule`` reads it, with its data ``options``; a missing list is a UserError."""
    if not Path(root).is_dir():
        raise UserError("data root does not exist or is not a folder", where=str(root),
                        fix="set DATA_ROOT to the dataset's top folder (see the README for the expected layout)")
    return UNIT_COUNTERS[datamodule](Path(root), options, val_holdout)


def data_root(name: str, root: str | Path | None, synthetic: bool, layout_hint: str) -> Path:
    """The folder of data set ``name``: ``root`` if given; a synthetic set's generated folder (made on first use)."""
    if root not in (None, ""):
        return Path(root).expanduser()
    if synthetic:
        from datamodules.synthetic import ensure_synthetic

        return ensure_synthetic(name)
    raise UserError(
        f"dataset '{name}' needs DATA_ROOT (the folder holding {layout_hint})",
        where="DATA_ROOT= (--data-root, data.root) is not set",
        fix=f"e.g. make bench DATASET={name} DATA_ROOT=/path/to/{name.upper()}",
    )
