"""benchmark.score.score_folders on small NIfTI / HDF5 folders with hand-computed answers, and its user errors."""
from __future__ import annotations

import math

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from benchmark.score import print_scores, score_folders
from core.errors import UserError

SHAPE = (8, 8, 8)
SPACING = (2.0, 1.0, 1.0)


def write_nifti(path, labels, spacing=SPACING):
    nib.save(nib.Nifti1Image(np.asarray(labels), np.diag([*spacing, 1.0])), path)


def write_h5(path, labels, dataset="label", spacing=None):
    with h5py.File(path, "w") as file:
        file.create_dataset(dataset, data=labels)
        if spacing is not None:
            file.attrs["spacing"] = spacing


def two_voxel_cube(start: int, label: int = 1) -> np.ndarray:
    """A 2x2x2 cube (every voxel is on its surface) starting at ``start`` along axis 0."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[start:start + 2, 2:4, 2:4] = label
    return labels


def ground_truth() -> np.ndarray:
    labels = two_voxel_cube(2)
    labels[6, 6, 6] = 2
    return labels


def shifted_prediction() -> np.ndarray:
    """Class 1 shifted by one voxel along axis 0 (half overlaps: dice 1/2, jaccard 1/3, surface distances four 0s
    and four 1s each way: hd95 1 and asd 1/2 voxel, or 2 and 1 at spacing 2), class 2 missed."""
    return two_voxel_cube(3)


DIAGONAL_VOXELS = math.sqrt(3 * 7**2)
DIAGONAL_MM = math.sqrt((7 * 2.0) ** 2 + 7**2 + 7**2)


@pytest.fixture
def nifti_folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for case, prediction in {"case_a": ground_truth(), "case_b": shifted_prediction()}.items():
        write_nifti(gt_dir / f"{case}.nii.gz", ground_truth())
        write_nifti(pred_dir / f"{case}.nii.gz", prediction)
    return pred_dir, gt_dir


def metrics_of(scores: pd.DataFrame, case, cls) -> dict[str, float]:
    row = scores[(scores["case"] == case) & (scores["class"] == cls)]
    assert len(row) == 1, (case, cls)
    return row.iloc[0][["dice", "jaccard", "hd95", "asd"]].astype(float).to_dict()


PERFECT = {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_nifti_folders_in_voxels(nifti_folders):
    scores = score_folders(*nifti_folders)
    assert list(scores.columns) == ["case", "class", "dice", "jaccard", "hd95", "asd"]
    assert list(zip(scores["case"], scores["class"])) == [
        ("case_a", 1), ("case_a", 2), ("case_b", 1), ("case_b", 2), ("mean", 1), ("mean", 2), ("mean", "all")
    ]
    assert metrics_of(scores, "case_a", 1) == PERFECT
    assert metrics_of(scores, "case_a", 2) == PERFECT
    assert metrics_of(scores, "case_b", 1) == pytest.approx({"dice": 0.5, "jaccard": 1 / 3, "hd95": 1.0, "asd": 0.5})
    missed = {"dice": 0.0, "jaccard": 0.0, "hd95": DIAGONAL_VOXELS, "asd": DIAGONAL_VOXELS}
    assert metrics_of(scores, "case_b", 2) == pytest.approx(missed)
    class_1 = {"dice": 0.75, "jaccard": 2 / 3, "hd95": 0.5, "asd": 0.25}
    class_2 = {"dice": 0.5, "jaccard": 0.5, "hd95": DIAGONAL_VOXELS / 2, "asd": DIAGONAL_VOXELS / 2}
    assert metrics_of(scores, "mean", 1) == pytest.approx(class_1)
    assert metrics_of(scores, "mean", 2) == pytest.approx(class_2)
    assert metrics_of(scores, "mean", "all") == pytest.approx({k: (class_1[k] + class_2[k]) / 2 for k in class_1})


def test_nifti_folders_with_spacing(nifti_folders):
    scores = score_folders(*nifti_folders, use_spacing=True)
    assert metrics_of(scores, "case_b", 1) == pytest.approx({"dice": 0.5, "jaccard": 1 / 3, "hd95": 2.0, "asd": 1.0})
    assert metrics_of(scores, "case_b", 2)["hd95"] == pytest.approx(DIAGONAL_MM)


def test_literature_policy_gives_zeros_for_a_missed_class(nifti_folders):
    scores = score_folders(*nifti_folders, empty_policy="literature")
    assert metrics_of(scores, "case_b", 2) == {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}


def test_explicit_num_classes_adds_absent_classes(nifti_folders):
    scores = score_folders(*nifti_folders, num_classes=4)
    assert metrics_of(scores, "case_a", 3) == PERFECT
    assert sorted(scores.loc[scores["case"] == "mean", "class"], key=str) == [1, 2, 3, "all"]


def test_writes_csv(nifti_folders, tmp_path):
    out_csv = tmp_path / "results" / "scores.csv"
    scores = score_folders(*nifti_folders, out_csv=out_csv)
    written = pd.read_csv(out_csv)
    assert written.shape == scores.shape
    assert written["dice"].tolist() == pytest.approx(scores["dice"].tolist())


def test_print_scores(nifti_folders, capsys):
    print_scores(score_folders(*nifti_folders))
    printed = capsys.readouterr().out
    assert "case_a" in printed and "case_b" in printed
    assert "mean over 2 cases" in printed and "voxels" in printed
    assert "0.5000" in printed


def test_h5_folders_with_spacing_attribute_and_prediction_dataset(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_h5(gt_dir / "p1.h5", two_voxel_cube(2), spacing=SPACING)
    write_h5(pred_dir / "p1.h5", shifted_prediction(), dataset="prediction")
    with h5py.File(gt_dir / "p2.h5", "w") as file:  # spacing stored as a dataset next to the label
        file["label"], file["spacing"] = two_voxel_cube(2), np.array(SPACING)
    write_h5(pred_dir / "p2.h5", two_voxel_cube(2), dataset="label")
    write_nifti(gt_dir / "p3.nii", two_voxel_cube(2))  # formats may differ between the two folders
    write_h5(pred_dir / "p3.h5", two_voxel_cube(2), dataset="prediction")
    scores = score_folders(pred_dir, gt_dir, use_spacing=True)
    assert list(scores["class"]) == [1, 1, 1, 1, "all"]
    assert metrics_of(scores, "p1", 1) == pytest.approx({"dice": 0.5, "jaccard": 1 / 3, "hd95": 2.0, "asd": 1.0})
    assert metrics_of(scores, "p2", 1) == PERFECT
    assert metrics_of(scores, "p3", 1) == PERFECT


def test_h5_without_spacing_uses_one_and_warns(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_h5(gt_dir / "p1.h5", two_voxel_cube(2))
    write_h5(pred_dir / "p1.h5", shifted_prediction())
    with pytest.warns(UserWarning, match="no spacing.*p1"):
        scores = score_folders(pred_dir, gt_dir, use_spacing=True)
    assert metrics_of(scores, "p1", 1)["hd95"] == pytest.approx(1.0)


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_nifti(gt_dir / "c.nii.gz", ground_truth())
    write_nifti(pred_dir / "c.nii.gz", ground_truth().astype(np.float32))
    assert metrics_of(score_folders(pred_dir, gt_dir), "c", 2) == PERFECT


def test_differing_spacing_is_refused_with_spacing_units(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    write_nifti(pred_dir / "case_b.nii.gz", shifted_prediction(), spacing=(5.0, 1.0, 1.0))
    with pytest.raises(UserError, match="spacing .* differs"):
        score_folders(pred_dir, gt_dir, use_spacing=True)
    assert metrics_of(score_folders(pred_dir, gt_dir), "case_b", 1)["hd95"] == pytest.approx(1.0)  # voxels: no spacing used


def test_prediction_without_ground_truth_warns_and_is_not_scored(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    write_nifti(pred_dir / "extra_case.nii.gz", ground_truth())
    with pytest.warns(UserWarning, match="extra_case"):
        scores = score_folders(pred_dir, gt_dir)
    assert "extra_case" not in set(scores["case"])


def test_labels_above_num_classes_are_refused(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    with pytest.raises(UserError, match="label.* 2 outside the classes 0 .. 1"):
        score_folders(pred_dir, gt_dir, num_classes=2)


def test_missing_prediction_folder(tmp_path, nifti_folders):
    _, gt_dir = nifti_folders
    with pytest.raises(UserError, match="prediction folder does not exist") as error:
        score_folders(tmp_path / "nowhere", gt_dir)
    assert str(tmp_path / "nowhere") in str(error.value)


def test_ground_truth_folder_without_label_files(tmp_path, nifti_folders):
    pred_dir, _ = nifti_folders
    empty = tmp_path / "empty_gt"
    empty.mkdir()
    (empty / "notes.txt").write_text("no labels here")
    with pytest.raises(UserError, match="ground-truth folder has no") as error:
        score_folders(pred_dir, empty)
    assert str(empty) in str(error.value)


def test_same_folder_for_both(nifti_folders):
    _, gt_dir = nifti_folders
    with pytest.raises(UserError, match="same folder"):
        score_folders(gt_dir, gt_dir)


def test_ground_truth_without_prediction_names_the_cases(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for index in range(12):
        write_h5(gt_dir / f"case{index:02d}.h5", two_voxel_cube(2))
    write_h5(pred_dir / "case00.h5", two_voxel_cube(2))
    with pytest.raises(UserError, match="11 ground-truth case") as error:
        score_folders(pred_dir, gt_dir)
    message = str(error.value)
    assert all(f"case{index:02d}" in message for index in range(1, 11))
    assert "case11" not in message and "and 1 more" in message


def test_shape_mismatch_names_case_and_shapes(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    write_nifti(pred_dir / "case_b.nii.gz", np.zeros((8, 8, 7), dtype=np.uint8))
    with pytest.raises(UserError, match=r"case 'case_b'.*\(8, 8, 7\).*\(8, 8, 8\)"):
        score_folders(pred_dir, gt_dir)


@pytest.mark.parametrize("file_name", ["case_b.nii.gz", "case_b.h5"])
def test_corrupt_file_is_named(nifti_folders, file_name):
    pred_dir, gt_dir = nifti_folders
    (pred_dir / "case_b.nii.gz").unlink()
    corrupt = pred_dir / file_name
    corrupt.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="cannot read label file") as error:
        score_folders(pred_dir, gt_dir)
    assert str(corrupt) in str(error.value)


def test_truncated_nifti_is_named(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    truncated = pred_dir / "case_a.nii.gz"
    noise = np.random.default_rng(0).integers(0, 3, size=(32, 32, 32), dtype=np.uint8)  # data far beyond the header
    write_nifti(truncated, noise)
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    with pytest.raises(UserError, match="cannot read label file") as error:
        score_folders(pred_dir, gt_dir)
    assert str(truncated) in str(error.value)


def test_h5_without_label_dataset_is_named(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_h5(gt_dir / "p1.h5", two_voxel_cube(2), dataset="image")
    write_h5(pred_dir / "p1.h5", two_voxel_cube(2))
    with pytest.raises(UserError, match="no 'label' dataset.*'image'") as error:
        score_folders(pred_dir, gt_dir)
    assert str(gt_dir / "p1.h5") in str(error.value)


def test_probability_maps_are_refused(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    probabilities = pred_dir / "case_a.nii.gz"
    write_nifti(probabilities, ground_truth() * 0.3)
    with pytest.raises(UserError, match="non-integer") as error:
        score_folders(pred_dir, gt_dir)
    assert str(probabilities) in str(error.value)


def test_two_files_for_one_case(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    write_nifti(pred_dir / "case_a.nii", ground_truth())
    with pytest.raises(UserError, match="two prediction files for case 'case_a'"):
        score_folders(pred_dir, gt_dir)


def test_bad_arguments(nifti_folders):
    with pytest.raises(UserError, match="empty-mask policy"):
        score_folders(*nifti_folders, empty_policy="ignore")
    with pytest.raises(UserError, match="num_classes"):
        score_folders(*nifti_folders, num_classes=1)


def test_a_ground_truth_stored_as_0_255_is_refused_not_read_as_256_classes(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_nifti(gt_dir / "c.nii.gz", two_voxel_cube(2) * 255)
    write_nifti(pred_dir / "c.nii.gz", two_voxel_cube(2))
    with pytest.raises(UserError, match=r"labels are \{0, 255\}, not 0 .. 255"):
        score_folders(pred_dir, gt_dir)
    with pytest.raises(UserError, match="255 outside the classes 0 .. 1"):  # an explicit count does not hide it
        score_folders(pred_dir, gt_dir, num_classes=2)


def test_a_prediction_with_labels_beyond_the_classes_is_refused(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    write_nifti(gt_dir / "c.nii.gz", two_voxel_cube(2))
    write_nifti(pred_dir / "c.nii.gz", two_voxel_cube(2) * 255)
    with pytest.raises(UserError, match="255 outside the classes 0 .. 1"):
        score_folders(pred_dir, gt_dir)


def _flipped_affine(affine: np.ndarray, shape, axis: int) -> np.ndarray:
    """The affine of the same volume stored with ``axis`` reversed."""
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1, shape[axis] - 1
    return affine @ flip


@pytest.mark.parametrize("axis", [0, 2])
def test_a_prediction_stored_flipped_with_an_affine_that_says_so_is_scored_in_the_ground_truth_orientation(tmp_path, axis):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(ground_truth(), affine), gt_dir / "c.nii.gz")
    flipped = np.flip(ground_truth(), axis=axis).copy()
    nib.save(nib.Nifti1Image(flipped, _flipped_affine(affine, SHAPE, axis)), pred_dir / "c.nii.gz")
    scores = score_folders(pred_dir, gt_dir, use_spacing=True)
    assert metrics_of(scores, "c", 1) == PERFECT and metrics_of(scores, "c", 2) == PERFECT


def test_a_prediction_on_another_grid_after_reorientation_is_refused(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    nib.save(nib.Nifti1Image(ground_truth(), np.diag([-1.0, 1.0, 1.0, 1.0])), gt_dir / "c.nii.gz")  # LAS, origin 0
    nib.save(nib.Nifti1Image(ground_truth(), np.eye(4)), pred_dir / "c.nii.gz")  # RAS default: which one is right?
    with pytest.raises(UserError, match="oriented RAS and the ground truth LAS"):
        score_folders(pred_dir, gt_dir)


def scattered_case(rng: np.random.Generator, shape=(30, 27, 13)) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) label maps: class 1 a ball predicted shifted plus isolated stray voxels all over the
    volume, class 2 present in the ground truth only (a missed structure), class 3 in neither file."""
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    ball = sum((axis - centre) ** 2 for axis, centre in zip(grid, (14, 13, 6))) <= 25
    gt = ball.astype(np.uint8)
    gt[1:3, 1:3, 1:3] = 2
    pred = np.roll(ball, 1, axis=0).astype(np.uint8)
    lattice = np.zeros(shape, dtype=bool)
    lattice[::2, ::2, ::2] = True
    lattice &= ~np.pad(np.ones((16, 15, 14), dtype=bool), [(6, shape[0] - 22), (5, shape[1] - 20), (0, 0)])[:, :, :shape[2]]
    pred.ravel()[rng.choice(np.flatnonzero(lattice), size=60, replace=False)] = 1
    return pred, gt


@pytest.fixture
def scattered_folders(tmp_path):
    rng = np.random.default_rng(3)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    for index in range(3):
        pred, gt = scattered_case(rng)
        write_nifti(gt_dir / f"case{index}.nii.gz", gt)
        write_nifti(pred_dir / f"case{index}.nii.gz", pred)
    write_h5(gt_dir / "case3.h5", ground_truth(), spacing=SPACING)  # the formats may be mixed in a folder
    write_h5(pred_dir / "case3.h5", shifted_prediction(), dataset="prediction")
    return pred_dir, gt_dir


@pytest.mark.parametrize("use_spacing", [False, True])
def test_scattered_false_positives_and_empty_classes_match_medpy(scattered_folders, use_spacing):
    from medpy.metric import binary as medpy_binary  # a test-only dependency

    pred_dir, gt_dir = scattered_folders
    scores = score_folders(pred_dir, gt_dir, use_spacing=use_spacing, num_classes=4, workers=2)
    for index in range(3):
        gt = np.asanyarray(nib.load(gt_dir / f"case{index}.nii.gz").dataobj)
        pred = np.asanyarray(nib.load(pred_dir / f"case{index}.nii.gz").dataobj)
        spacing = SPACING if use_spacing else None
        expected = {"dice": medpy_binary.dc(pred == 1, gt == 1), "jaccard": medpy_binary.jc(pred == 1, gt == 1),
                    "hd95": medpy_binary.hd95(pred == 1, gt == 1, voxelspacing=spacing),
                    "asd": medpy_binary.asd(pred == 1, gt == 1, voxelspacing=spacing)}
        assert metrics_of(scores, f"case{index}", 1) == pytest.approx(expected, abs=1e-6)
        diagonal = math.hypot(29 * (2.0 if use_spacing else 1.0), 26, 12)  # the (30, 27, 13) image's diagonal
        expected_miss = {"dice": 0.0, "jaccard": 0.0, "hd95": pytest.approx(diagonal), "asd": pytest.approx(diagonal)}
        assert metrics_of(scores, f"case{index}", 2) == expected_miss
        assert metrics_of(scores, f"case{index}", 3) == PERFECT  # absent from both files
    assert metrics_of(scores, "case3", 1)["hd95"] == pytest.approx(2.0 if use_spacing else 1.0)


def test_parallel_and_serial_scoring_write_identical_files(scattered_folders, tmp_path):
    serial, parallel = tmp_path / "serial.csv", tmp_path / "parallel.csv"
    score_folders(*scattered_folders, out_csv=serial, workers=1)
    score_folders(*scattered_folders, out_csv=parallel, workers=3)
    assert serial.read_bytes() == parallel.read_bytes()
    assert len(pd.read_csv(serial)) == 4 * 2 + 2 + 1  # 4 cases x classes 1-2, two class means, the overall mean


def test_an_error_in_a_worker_names_its_case(nifti_folders):
    pred_dir, gt_dir = nifti_folders
    write_nifti(pred_dir / "case_b.nii.gz", np.zeros((8, 8, 7), dtype=np.uint8))
    with pytest.raises(UserError, match="case 'case_b': prediction shape") as error:
        score_folders(pred_dir, gt_dir, workers=2)
    assert error.value.fix and "resolution" in error.value.fix


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_worker_counts(nifti_folders, workers):
    with pytest.raises(UserError, match="workers must be a whole number"):
        score_folders(*nifti_folders, workers=workers)


def test_cli_workers_option(nifti_folders, tmp_path):
    from benchmark.cli import build_parser, command_score

    parser = build_parser()
    out = tmp_path / "scores.csv"
    args = parser.parse_args(["score", *map(str, nifti_folders), "--workers", "2", "--out", str(out)])
    assert args.workers == 2 and parser.parse_args(["score", *map(str, nifti_folders)]).workers is None
    assert command_score(args) == 0
    assert "case_b" in out.read_text()
    with pytest.raises(UserError, match="whole number"):
        parser.parse_args(["score", *map(str, nifti_folders), "--workers", "two"])
