"""Score a folder of predicted label maps against a folder of ground-truth label maps.

Files are PNG / JPEG 2-D label maps (PNG: class indices, 0/255 read as 0/1; JPEG: a lossy mask, >= 128 is
foreground), NIfTI (``.nii``, ``.nii.gz``; spacing from the header zooms) or HDF5 (``.h5``; the label map in the
``label`` dataset, predictions may use ``prediction`` instead; spacing from a ``spacing`` attribute of the file or
of the dataset, or a ``spacing`` dataset, else none). A prediction and a ground truth belong to the same case when
their names are equal once the extension is stripped. Hidden files, sub-folders and other extensions are ignored.

Rules:
- every ground-truth case needs a prediction (otherwise an error naming the missing cases);
- predictions without a ground truth are ignored with a warning naming them (a folder holding predictions for
  more cases than the ground-truth folder, e.g. train and test, is still scored on the ground truth's cases);
- classes are ``1 .. num_classes - 1``; by default ``num_classes`` is the largest label in the ground-truth folder
  plus one (at least 2), and the ground-truth folder must then hold every label 0 .. num_classes - 1 (a mask stored
  as 0/255 would otherwise be scored as class 255 of 256); a label ``>= num_classes`` in any file is refused;
- NIfTI files are compared in the ground truth's orientation: a prediction whose affine orders or flips the axes
  differently is reoriented by the affines (and refused if it then still lies on another voxel grid);
- distances are in voxels unless ``use_spacing``; then the ground truth's spacing is used (1 where the file has
  none, with a warning), and a prediction that declares a different spacing is refused;
- metrics and the empty-mask rule are those of :mod:`core.metrics`;
- cases are scored in worker processes (``workers``, default one per core), each file read once; the output
  does not depend on the number of workers.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd

from core.errors import UserError
from core.metrics import METRIC_NAMES, binary_metrics, check_empty_policy, mean_over_cases, multiclass_metrics

LABEL_SUFFIXES = (".nii.gz", ".nii", ".h5", ".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GROUND_TRUTH_DATASETS = ("label",)
PREDICTION_DATASETS = ("prediction", "label")
MEAN_ROW = "mean"
ALL_CLASSES = "all"
COLUMNS = ("case", "class", *METRIC_NAMES)
MAX_NAMES_LISTED = 10


@dataclass(frozen=True)
class LabelVolume:
    labels: np.ndarray
    spacing: tuple[float, ...] | None  # None when the file declares no spacing
    affine: np.ndarray | None = None  # NIfTI only: voxel indices -> world coordinates


@dataclass(frozen=True)
class CaseScores:
    """What one worker sends back for one case: its rows and what the warnings need."""
    rows: list[dict]
    largest_label: int  # in the prediction or the ground truth
    largest_ground_truth_label: int
    ground_truth_labels: frozenset  # the labels present in the ground truth
    ground_truth_has_no_spacing: bool


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def score_folders(pred_dir, gt_dir, out_csv=None, use_spacing: bool = False, num_classes: int | None = None,
                  empty_policy: str = "penalty", workers: int | None = None) -> pd.DataFrame:
    """One row per (case, class) with dice, jaccard, hd95 and asd, then one ``mean`` row per class (mean over
    cases) and a ``mean`` row of class ``all`` (mean over the class means). Written to ``out_csv`` if given.

    Cases are scored in ``workers`` processes (default: one per core, as nnU-Net's evaluation does); the result
    does not depend on the number of workers."""
    check_empty_policy(empty_policy)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise UserError(f"workers must be a whole number >= 1, got {workers!r}",
                        fix="pass the number of processes to score cases in, e.g. --workers 2 (default: one per core)")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_files = _label_files(gt_dir, "ground-truth")
    pred_files = _label_files(pred_dir, "prediction")
    if pred_dir.resolve() == gt_dir.resolve():
        raise UserError("the prediction and ground-truth folders are the same folder", where=str(gt_dir),
                        fix="pass the folder your model wrote its predictions to")

    missing = sorted(gt_files.keys() - pred_files.keys())
    if missing:
        raise UserError(
            f"{len(missing)} ground-truth case(s) have no prediction: {_name_list(missing)}",
            where=f"predictions: {pred_dir}, ground truth: {gt_dir}",
            fix="predict every case; a prediction is matched by the ground truth's file name without extension",
        )
    unmatched = sorted(pred_files.keys() - gt_files.keys())
    if unmatched:
        warnings.warn(f"{len(unmatched)} prediction(s) without a ground truth are not scored: {_name_list(unmatched)}",
                      stacklevel=2)
    if num_classes is not None and num_classes < 2:
        raise UserError(f"num_classes must be at least 2 (background and one class), got {num_classes}",
                        fix="count the background: a binary task has num_classes=2")

    cases = sorted(gt_files)
    jobs = [(case, pred_files[case], gt_files[case], num_classes, use_spacing, empty_policy) for case in cases]
    per_case = dict(zip(cases, _run(_score_case, jobs, min(workers, len(jobs)))))

    if num_classes is None:
        num_classes = _inferred_num_classes(set().union(*(scored.ground_truth_labels for scored in per_case.values())), gt_dir)
        for case, scored in per_case.items():  # what the workers could not check without the class count
            if scored.largest_label >= num_classes:
                path = gt_files[case] if scored.largest_ground_truth_label >= num_classes else pred_files[case]
                _check_label_range(_read_label_volume(path, PREDICTION_DATASETS if path == pred_files[case]
                                                      else GROUND_TRUTH_DATASETS), num_classes, path)
    # Each case scored the classes up to its own largest label; the classes above it are absent from both masks.
    absent = binary_metrics(np.zeros(1, bool), np.zeros(1, bool), empty_policy=empty_policy)
    rows = []
    for case, scored in per_case.items():
        scored_rows = {row["class"]: row for row in scored.rows}
        rows += [scored_rows.get(c, {"case": case, "class": c, **absent}) for c in range(1, num_classes)]

    cases_without_spacing = [case for case, scored in per_case.items() if scored.ground_truth_has_no_spacing]
    if cases_without_spacing:
        warnings.warn(f"no spacing in the ground truth, distances use 1 per axis: {_name_list(cases_without_spacing)}",
                      stacklevel=2)

    scores = pd.DataFrame(rows + _mean_rows(rows, num_classes), columns=COLUMNS)
    scores.attrs["distance_unit"] = "spacing units (usually mm)" if use_spacing else "voxels"
    scores.attrs["empty_policy"] = empty_policy
    if out_csv is not None:
        _write_csv(scores, Path(out_csv))
    return scores


def _run(function, jobs: list[tuple], workers: int) -> list:
    """``function(*job)`` for every job, in order; in ``workers`` processes when more than one."""
    if workers <= 1:
        return [function(*job) for job in jobs]
    # fork starts a worker in milliseconds (spawn would import numpy, scipy and nibabel again in each).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:  # the first failing case (in case order) is reported; the others are not waited for
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _score_case(case: str, pred_path: Path, gt_path: Path, num_classes: int | None, use_spacing: bool,
                empty_policy: str) -> CaseScores:
    """Reads one case, checks it (orientation, shape, label range, spacing) and scores its classes
    ``1 .. largest label`` (at most ``num_classes - 1``)."""
    gt = _read_label_volume(gt_path, GROUND_TRUTH_DATASETS)
    pred = _read_label_volume(pred_path, PREDICTION_DATASETS)
    pred = _in_ground_truth_orientation(pred, gt, pred_path, gt_path)
    if pred.labels.shape != gt.labels.shape:
        raise UserError(
            f"case '{case}': prediction shape {pred.labels.shape} != ground-truth shape {gt.labels.shape}",
            where=f"{pred_path} vs {gt_path}",
            fix="save predictions at the ground truth's resolution and axis order (undo crop, padding, resampling)",
        )
    if num_classes is not None:
        _check_label_range(gt, num_classes, gt_path)
        _check_label_range(pred, num_classes, pred_path)
    ground_truth_labels = frozenset(np.unique(gt.labels).astype(int).tolist())
    largest_gt_label = max(ground_truth_labels)
    largest_label = max(_max_label(pred), largest_gt_label)
    spacing = None
    if use_spacing:
        if gt.spacing is not None:
            _check_same_spacing(pred, gt, pred_path, gt_path)
        spacing = _checked_spacing(gt, gt_path)
    last_class = largest_label if num_classes is None else min(largest_label, num_classes - 1)
    per_class = multiclass_metrics(pred.labels, gt.labels, last_class + 1, spacing, empty_policy)
    return CaseScores(
        rows=[{"case": case, "class": c, **class_metrics} for c, class_metrics in per_class.items()],
        largest_label=largest_label,
        largest_ground_truth_label=largest_gt_label,
        ground_truth_labels=ground_truth_labels,
        ground_truth_has_no_spacing=use_spacing and gt.spacing is None,
    )


def print_scores(scores: pd.DataFrame) -> None:
    """Prints the per-case rows, then the means, as two aligned tables."""
    is_mean = scores["case"] == MEAN_ROW
    float_format = "{:.4f}".format
    print(scores[~is_mean].to_string(index=False, float_format=float_format))
    unit = scores.attrs.get("distance_unit")
    header = f"mean over {scores.loc[~is_mean, 'case'].nunique()} cases"
    if unit:
        header += f" (hd95/asd in {unit}, empty-mask policy '{scores.attrs['empty_policy']}')"
    print(f"\n{header}:")
    print(scores[is_mean].drop(columns="case").to_string(index=False, float_format=float_format))


def _case_name(path: Path) -> str | None:
    """The file name without its label-file extension, or None if it is not a label file."""
    for suffix in LABEL_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _label_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"the {role} folder does not exist", where=str(folder),
                        fix=f"pass the folder that holds the {role} .nii/.nii.gz/.h5/.png files")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = _case_name(path)
        if name is None or path.name.startswith(".") or not path.is_file():
            continue
        if name in files:
            raise UserError(f"two {role} files for case '{name}'", where=f"{files[name]} and {path}",
                            fix="keep one file per case")
        files[name] = path
    if not files:
        raise UserError(f"the {role} folder has no .nii, .nii.gz, .h5, .png or .jpg files", where=str(folder),
                        fix=f"pass the folder that holds the {role} files (sub-folders are not searched)")
    return files


def _read_label_volume(path: Path, dataset_names: tuple[str, ...]) -> LabelVolume:
    reader = _read_h5 if path.name.endswith(".h5") else _read_image if path.name.lower().endswith(IMAGE_SUFFIXES) else _read_nifti
    try:
        labels, spacing, *affine = reader(path, dataset_names)
    except UserError:
        raise
    except Exception as error:  # nibabel and h5py raise many exception types for truncated or corrupt files
        raise UserError(f"cannot read label file: {type(error).__name__}: {error}", where=str(path),
                        fix="re-export the file; check it opens with nibabel/h5py") from error
    return LabelVolume(_checked_labels(labels, path), spacing, *affine)


def _read_nifti(path: Path, dataset_names: tuple[str, ...]) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    image = nib.load(path)
    labels = np.asanyarray(image.dataobj)
    return labels, tuple(float(z) for z in image.header.get_zooms()[: labels.ndim]), image.affine


def _read_image(path: Path, dataset_names: tuple[str, ...]) -> tuple[np.ndarray, None]:
    """A 2-D label map from an image file: PNG values are class indices (a 0/255 mask counts as 0/1); a JPEG is a
    lossy binary mask, foreground = grey value >= 128 (as the endoscopy loaders read masks)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = np.asarray(image.convert("L") if image.mode not in ("L", "P", "I", "I;16") else image)
    if path.name.lower().endswith((".jpg", ".jpeg")):
        return (grey >= 128).astype(np.uint8), None
    if grey.max(initial=0) == 255 and set(np.unique(grey)) <= {0, 255}:
        return (grey // 255).astype(np.uint8), None
    return grey, None


def _read_h5(path: Path, dataset_names: tuple[str, ...]) -> tuple[np.ndarray, tuple[float, ...] | None]:
    with h5py.File(path, "r") as file:
        name = next((name for name in dataset_names if isinstance(file.get(name), h5py.Dataset)), None)
        if name is None:
            raise UserError(f"no '{' or '.join(dataset_names)}' dataset in the HDF5 file (it has {sorted(file)})",
                            where=str(path), fix=f"store the label map as '{dataset_names[0]}'")
        dataset = file[name]
        labels = dataset[()]
        spacing = file.attrs.get("spacing", dataset.attrs.get("spacing"))
        if spacing is None and isinstance(file.get("spacing"), h5py.Dataset):
            spacing = file["spacing"][()]
    if spacing is None:
        return labels, None
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) != labels.ndim:
        raise UserError(f"'spacing' has {len(spacing)} values for a {labels.ndim}-D label map", where=str(path),
                        fix="store one spacing value per axis, in the array's axis order")
    return labels, spacing


def _checked_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """The label map itself if it holds non-negative integers (floats with integer values are accepted)."""
    if labels.size == 0:
        raise UserError(f"the label map is empty (shape {labels.shape})", where=str(path))
    if labels.dtype.kind not in "biuf":
        raise UserError(f"the label map has dtype {labels.dtype}, not numbers", where=str(path),
                        fix="store integer labels 0, 1, 2, ...")
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise UserError("the label map has non-integer values (probabilities?)", where=str(path),
                        fix="save the argmax label map, not probabilities or logits")
    if labels.min() < 0:
        raise UserError(f"the label map has negative labels (min {labels.min()})", where=str(path),
                        fix="labels are 0 (background), 1, 2, ...")
    return labels


# ---- input checks: label values, orientation, spacing ----------------------------------------------------------
def _inferred_num_classes(present: set[int], gt_dir: Path) -> int:
    """1 + the largest ground-truth label (at least 2), if the folder holds every label 0 .. that largest one."""
    num_classes = max(2, 1 + max(present))
    absent = sorted(set(range(num_classes)) - present)
    if len(absent) > 0 and max(present) > 1:
        shown = ", ".join(map(str, sorted(present)[:10])) + (" ..." if len(present) > 10 else "")
        raise UserError(
            f"the ground-truth labels are {{{shown}}}, not 0 .. {num_classes - 1}: read as they are, that is "
            f"{num_classes} classes, {len(absent)} of them never present (a mask stored as 0/255?)",
            where=str(gt_dir),
            fix="store labels 0 (background), 1, 2, ... (e.g. mask // 255 for 0/255 masks); if some classes are "
                "absent from every case, give the class count (--num-classes)")
    return num_classes


def _check_label_range(volume: LabelVolume, num_classes: int, path: Path) -> None:
    if _max_label(volume) >= num_classes:
        outside = [int(v) for v in np.unique(volume.labels) if v >= num_classes]
        raise UserError(
            f"label(s) {', '.join(map(str, outside[:10]))} outside the classes 0 .. {num_classes - 1}", where=str(path),
            fix="labels are 0 (background) .. num_classes - 1 (e.g. mask // 255 for 0/255 masks); give --num-classes "
                "if the ground truth lacks a class")


def _in_ground_truth_orientation(pred: LabelVolume, gt: LabelVolume, pred_path: Path, gt_path: Path) -> LabelVolume:
    """The prediction with its axes ordered and flipped as the ground truth's, by the two NIfTI affines (unchanged
    if either file has none, or both have the same orientation). A prediction that, reoriented, still lies on
    another voxel grid than the ground truth (a default identity affine, another origin) is refused: whether its
    array or its affine is right cannot be told."""
    if pred.affine is None or gt.affine is None or pred.labels.ndim != 3 or gt.labels.ndim != 3:
        return pred
    from nibabel import orientations

    pred_axes, gt_axes = orientations.io_orientation(pred.affine), orientations.io_orientation(gt.affine)
    if np.array_equal(pred_axes, gt_axes):
        return pred
    transform = orientations.ornt_transform(pred_axes, gt_axes)
    labels = orientations.apply_orientation(pred.labels, transform)
    affine = pred.affine @ orientations.inv_ornt_aff(transform, pred.labels.shape)
    tolerance = 1e-3 * float(np.abs(gt.affine[:3, :3]).max())
    if labels.shape != gt.labels.shape or not np.allclose(affine, gt.affine, atol=tolerance):
        codes = lambda axes: "".join(orientations.ornt2axcodes(axes))  # noqa: E731
        raise UserError(
            f"the prediction is oriented {codes(pred_axes)} and the ground truth {codes(gt_axes)}, and reoriented by "
            "its affine the prediction does not lie on the ground truth's voxel grid", where=f"{pred_path} vs {gt_path}",
            fix="save each prediction with its ground truth's affine (header), in the ground truth's array order")
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return LabelVolume(np.ascontiguousarray(labels), zooms if pred.spacing is not None else None, affine)


def _check_same_spacing(pred: LabelVolume, gt: LabelVolume, pred_path: Path, gt_path: Path) -> None:
    """Distances in spacing units need the prediction on the ground truth's grid: a declared other spacing is refused."""
    if pred.spacing is not None and not np.allclose(pred.spacing, gt.spacing, rtol=1e-4):
        raise UserError(
            f"the prediction's spacing {pred.spacing} differs from the ground truth's {gt.spacing}", where=f"{pred_path} vs {gt_path}",
            fix="save predictions at the ground truth's resolution with its header, or score in voxels (without --spacing)")


def _checked_spacing(volume: LabelVolume, path: Path) -> tuple[float, ...]:
    if volume.spacing is None:
        return (1.0,) * volume.labels.ndim
    if not all(np.isfinite(s) and s > 0 for s in volume.spacing):
        raise UserError(f"invalid voxel spacing {volume.spacing}", where=str(path),
                        fix="fix the header's spacing (zooms) or score without use_spacing")
    return volume.spacing


def _max_label(volume: LabelVolume) -> int:
    return int(volume.labels.max())


def _mean_rows(rows: list[dict], num_classes: int) -> list[dict]:
    class_means = []
    for c in range(1, num_classes):
        mean = mean_over_cases([{name: row[name] for name in METRIC_NAMES} for row in rows if row["class"] == c])
        class_means.append({"case": MEAN_ROW, "class": c, **mean})
    overall = mean_over_cases([{name: row[name] for name in METRIC_NAMES} for row in class_means])
    return class_means + [{"case": MEAN_ROW, "class": ALL_CLASSES, **overall}]


def _write_csv(scores: pd.DataFrame, out_csv: Path) -> None:
    try:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(out_csv, index=False)
    except OSError as error:
        raise UserError(f"cannot write the scores: {error}", where=str(out_csv),
                        fix="choose a writable output path") from error


def _name_list(names: list[str]) -> str:
    listed = ", ".join(names[:MAX_NAMES_LISTED])
    return listed + (f" and {len(names) - MAX_NAMES_LISTED} more" if len(names) > MAX_NAMES_LISTED else "")
