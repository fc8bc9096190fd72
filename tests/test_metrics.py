"""core.metrics against medpy (the reference every SSL-MIS paper uses), the empty-mask rule and helpers."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from core import metrics as metrics_module
from core.errors import UserError
from core.metrics import (
    EMPTY_POLICIES,
    binary_metrics,
    keep_largest_component_per_class,
    largest_connected_component,
    mean_over_cases,
    multiclass_metrics,
)
from benchmark.perf.data import perturbed_acdc_prediction
from tests.conftest import require_real_acdc

ACDC_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ACDC" / "data"
TOLERANCE = 1e-6


def medpy_metrics(pred, gt, spacing=None) -> dict[str, float]:
    from medpy.metric import binary as medpy_binary  # a test-only dependency: the package never imports medpy

    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing),
    }


def assert_matches_medpy(pred, gt, spacing=None) -> None:
    ours = binary_metrics(pred, gt, spacing)
    expected = medpy_metrics(pred, gt, spacing)
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=TOLERANCE), name
        assert type(ours[name]) is float


def random_blobs(rng: np.random.Generator, shape: tuple[int, ...], blobs: int, holes: int) -> np.ndarray:
    """A union of random ellipsoids (centres anywhere, so some are cut by the array edge) minus small balls."""
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]

    def ellipsoid(max_radius: float) -> np.ndarray:
        centre = rng.uniform(0, shape)
        radii = rng.uniform(1, max_radius, size=len(shape))
        return sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii)) <= 1

    mask = np.zeros(shape, dtype=bool)
    for _ in range(blobs):
        mask |= ellipsoid(max(shape) / 3)
    for _ in range(holes):
        mask &= ~ellipsoid(3)
    if not mask.any():
        mask[tuple(rng.integers(0, shape))] = True
    return mask


def perturbed(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A plausible prediction: the mask shifted by up to 2 voxels, with a few voxels flipped."""
    shifted = ndimage.shift(mask, rng.integers(-2, 3, size=mask.ndim), order=0, mode="constant", cval=False)
    noisy = shifted ^ (rng.random(mask.shape) < 0.01)
    return noisy if noisy.any() else mask


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_random_blobs_match_medpy(ndim, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(size) for size in rng.integers(20, 40 if ndim == 3 else 90, size=ndim))
    gt = random_blobs(rng, shape, blobs=int(rng.integers(1, 4)), holes=int(rng.integers(0, 4)))
    independent = random_blobs(rng, shape, blobs=int(rng.integers(1, 4)), holes=int(rng.integers(0, 4)))
    anisotropic = tuple(rng.uniform(0.3, 5.0, size=ndim))
    for pred in (perturbed(rng, gt), independent):
        for spacing in (None, anisotropic):
            assert_matches_medpy(pred, gt, spacing)
            assert_matches_medpy(gt, pred, spacing)


@pytest.mark.parametrize("distances_by", ["tree", "transform"])
@pytest.mark.parametrize("seed", range(4))
def test_both_distance_paths_match_medpy(monkeypatch, distances_by, seed):
    """The metric picks a k-d tree or a cropped distance transform by box size; both must be medpy-exact."""
    monkeypatch.setattr(metrics_module, "EDT_MAX_BOX_VOXELS_PER_SURFACE_VOXEL", 0 if distances_by == "tree" else 10**9)
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(size) for size in rng.integers(20, 40, size=3))
    gt = random_blobs(rng, shape, blobs=2, holes=2)
    pred = perturbed(rng, gt)
    for spacing in (None, tuple(rng.uniform(0.3, 5.0, size=3))):
        assert_matches_medpy(pred, gt, spacing)
    for case in ("corner voxel vs ball", "hollow ball vs ball", "one-voxel-thick plane"):
        assert_matches_medpy(*SPECIAL_CASES[case], (2.5, 0.7, 1.3))


def test_distance_path_choice_follows_the_box_size(monkeypatch):
    """A far stray voxel makes the box large and the surfaces sparse (tree); a compact pair uses the transform."""
    chosen = []
    monkeypatch.setattr(metrics_module, "_distances_by_tree", lambda *a: chosen.append("tree") or (np.zeros(1), np.zeros(1)))
    monkeypatch.setattr(metrics_module, "_distances_by_transform", lambda *a: chosen.append("transform") or (np.zeros(1), np.zeros(1)))
    compact = ball((40, 40, 40), (20, 20, 20), 8)
    binary_metrics(compact, ball((40, 40, 40), (21, 20, 20), 8))
    stray = compact.copy()
    stray[0, 0, 0] = stray[39, 39, 39] = True
    small = ball((40, 40, 40), (20, 20, 20), 2)
    binary_metrics(stray & ~compact | small, small)
    assert chosen == ["transform", "tree"]


def scattered_false_positives(rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
    """``mask`` plus ``count`` isolated single voxels anywhere (on a stride-2 lattice, away from the mask), as a
    half-trained network predicts: every one is its own component and a surface voxel."""
    lattice = np.zeros(mask.shape, dtype=bool)
    lattice[::2, ::2, ::2] = True
    lattice &= ~ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 3))
    scattered = mask.copy()
    scattered.ravel()[rng.choice(np.flatnonzero(lattice), size=count, replace=False)] = True
    return scattered


@pytest.mark.parametrize("surfaces_by", ["box", "mask voxels"])
@pytest.mark.parametrize("distances_by", ["tree", "transform"])
@pytest.mark.parametrize("seed", range(2))
def test_scattered_false_positives_match_medpy(monkeypatch, surfaces_by, distances_by, seed):
    """Hundreds of stray voxels all over the volume (the case that makes surface distances expensive), through
    both ways of finding the surfaces and both ways of measuring the distances."""
    monkeypatch.setattr(metrics_module, "MAX_BOX_VOXELS_PER_MASK_VOXEL", 10**9 if surfaces_by == "box" else 0)
    monkeypatch.setattr(metrics_module, "EDT_MAX_BOX_VOXELS_PER_SURFACE_VOXEL", 0 if distances_by == "tree" else 10**9)
    rng = np.random.default_rng(200 + seed)
    shape = (41, 36, 23)  # no axis a multiple of 8: the word-wise voxel search has a tail
    gt = ball(shape, (20, 18, 11), 7)
    pred = scattered_false_positives(rng, perturbed(rng, gt), count=300)
    assert ndimage.label(pred & ~ndimage.binary_dilation(gt, iterations=3))[1] > 250
    for spacing in (None, (0.625, 0.625, 2.5)):
        assert_matches_medpy(pred, gt, spacing)
        assert_matches_medpy(gt, pred, spacing)


@pytest.mark.parametrize("surfaces_by", ["box", "mask voxels"])
def test_fortran_ordered_arrays_give_medpy_numbers_to_the_last_bit(monkeypatch, surfaces_by):
    """NIfTI arrays are Fortran-ordered; they are read through their transpose and the ASD summed in medpy's order."""
    monkeypatch.setattr(metrics_module, "MAX_BOX_VOXELS_PER_MASK_VOXEL", 10**9 if surfaces_by == "box" else 0)
    rng = np.random.default_rng(7)
    gt = ball((40, 33, 20), (20, 15, 10), 9)
    pred = scattered_false_positives(rng, perturbed(rng, gt), count=100)
    pred_f, gt_f = np.asfortranarray(pred.astype(np.uint8)), np.asfortranarray(gt.astype(np.uint8))
    assert pred_f.flags.f_contiguous and not pred_f.flags.c_contiguous
    ours = binary_metrics(pred_f, gt_f)
    assert ours == binary_metrics(pred, gt)
    assert ours == {name: float(value) for name, value in medpy_metrics(pred_f, gt_f).items()}


@pytest.mark.parametrize("size", [1, 7, 8, 9, 64, 1001])
def test_flat_indices_equal_numpy_flatnonzero(size):
    rng = np.random.default_rng(size)
    for density in (0.0, 0.01, 0.5, 1.0):
        mask = rng.random(size) < density
        assert np.array_equal(metrics_module._flat_indices(mask), np.flatnonzero(mask))


def single_voxel(shape, index) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[index] = True
    return mask


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, size) for size in shape)]
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= radius**2


SHAPE = (17, 21, 13)
SPECIAL_CASES = {
    "same single voxel": (single_voxel(SHAPE, (4, 5, 6)), single_voxel(SHAPE, (4, 5, 6))),
    "two single voxels": (single_voxel(SHAPE, (4, 5, 6)), single_voxel(SHAPE, (10, 2, 11))),
    "corner voxel vs ball": (single_voxel(SHAPE, (0, 0, 0)), ball(SHAPE, (8, 10, 6), 5)),
    "whole image vs ball": (np.ones(SHAPE, dtype=bool), ball(SHAPE, (8, 10, 6), 5)),
    "ball cut by all borders": (ball(SHAPE, (8, 10, 6), 12), ball(SHAPE, (9, 10, 6), 6)),
    "hollow ball vs ball": (ball(SHAPE, (8, 10, 6), 6) & ~ball(SHAPE, (8, 10, 6), 3), ball(SHAPE, (8, 10, 6), 6)),
    "one-voxel-thick plane": (ball(SHAPE, (8, 10, 6), 7) & (np.arange(SHAPE[2]) == 6), ball(SHAPE, (8, 10, 6), 5)),
    "labels, not booleans": (ball(SHAPE, (8, 10, 6), 5).astype(np.uint8) * 3, ball(SHAPE, (7, 9, 6), 5).astype(float)),
}


@pytest.mark.parametrize("spacing", [None, (2.5, 0.7, 1.3)])
@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_special_masks_match_medpy(case, spacing):
    pred, gt = SPECIAL_CASES[case]
    assert_matches_medpy(pred, gt, spacing)
    assert_matches_medpy(gt, pred, spacing)


def test_one_dimensional_masks_match_medpy():
    pred = np.array([0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1], dtype=bool)
    gt = np.array([1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    assert_matches_medpy(pred, gt)
    assert_matches_medpy(pred, gt, (0.5,))


def acdc_volumes() -> list[Path]:
    require_real_acdc()  # skips outside CI with the missing path, fails in CI
    files = sorted(ACDC_DATA.glob("patient*_frame01.h5"))
    assert files, f"no patientNNN_frame01.h5 files in {ACDC_DATA}"
    return files[:: max(1, len(files) // 3)][:3]


@pytest.mark.real_data
@pytest.mark.parametrize("spacing", [None, (10.0, 1.5, 1.5)])
def test_real_acdc_masks_match_medpy(spacing):
    for path in acdc_volumes():
        with h5py.File(path, "r") as file:
            gt = file["label"][()]
        pred = perturbed_acdc_prediction(gt)
        ours = multiclass_metrics(pred, gt, num_classes=4, spacing=spacing)
        assert sorted(ours) == [1, 2, 3]
        for c in (1, 2, 3):
            assert (pred == c).any() and (gt == c).any(), f"{path.name} class {c} is empty"
            expected = medpy_metrics(pred == c, gt == c, spacing)
            for name, value in expected.items():
                assert ours[c][name] == pytest.approx(value, abs=TOLERANCE), (path.name, c, name)


EMPTY_SHAPE, EMPTY_SPACING = (5, 7, 9), (3.0, 1.0, 0.5)
DIAGONAL = 14.0  # sqrt((4*3)^2 + (6*1)^2 + (8*0.5)^2)
PENALTY_MISS = {"dice": 0.0, "jaccard": 0.0, "hd95": DIAGONAL, "asd": DIAGONAL}
ALL_ZERO = {"dice": 0.0, "jaccard": 0.0, "hd95": 0.0, "asd": 0.0}


@pytest.mark.parametrize(
    "pred_empty, gt_empty, policy, expected",
    [
        (True, True, "penalty", {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}),
        (True, False, "penalty", PENALTY_MISS),
        (False, True, "penalty", PENALTY_MISS),
        (True, True, "literature", ALL_ZERO),
        (True, False, "literature", ALL_ZERO),
        (False, True, "literature", ALL_ZERO),
    ],
)
def test_empty_mask_policies(pred_empty, gt_empty, policy, expected):
    blob = ball(EMPTY_SHAPE, (2, 3, 4), 2)
    empty = np.zeros(EMPTY_SHAPE, dtype=bool)
    pred, gt = (empty if pred_empty else blob), (empty if gt_empty else blob)
    assert binary_metrics(pred, gt, EMPTY_SPACING, empty_policy=policy) == pytest.approx(expected)


def test_penalty_diagonal_is_in_voxels_without_spacing():
    empty, blob = np.zeros(EMPTY_SHAPE, dtype=bool), ball(EMPTY_SHAPE, (2, 3, 4), 2)
    assert binary_metrics(empty, blob)["hd95"] == pytest.approx(math.sqrt(4**2 + 6**2 + 8**2))


def test_default_policy_is_penalty():
    assert EMPTY_POLICIES[0] == "penalty"
    empty, blob = np.zeros((4, 4), dtype=bool), single_voxel((4, 4), (1, 1))
    assert binary_metrics(empty, blob)["hd95"] == pytest.approx(math.sqrt(18))


def test_multiclass_metrics_scores_each_foreground_class():
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[1:3, 1:3], gt[4:6, 4:6] = 1, 2
    pred = gt.copy()
    pred[4:6, 4:6] = 0  # class 2 missed, class 3 absent from both
    scores = multiclass_metrics(pred, gt, num_classes=4)
    assert sorted(scores) == [1, 2, 3]
    assert scores[1] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    assert scores[2]["dice"] == 0.0 and scores[2]["hd95"] == pytest.approx(math.sqrt(50))
    assert scores[3] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


@pytest.mark.parametrize(
    "pred, gt, spacing, policy",
    [
        (np.ones((3, 4)), np.ones((4, 3)), None, "penalty"),
        (np.ones((3, 4)), np.ones((3, 4)), (1.0, 1.0, 1.0), "penalty"),
        (np.ones((3, 4)), np.ones((3, 4)), (1.0, 0.0), "penalty"),
        (np.ones((3, 4)), np.ones((3, 4)), None, "nan"),
    ],
    ids=["shape mismatch", "spacing length", "zero spacing", "unknown policy"],
)
def test_bad_inputs_are_user_errors(pred, gt, spacing, policy):
    with pytest.raises(UserError):
        binary_metrics(pred, gt, spacing, empty_policy=policy)


def test_shape_mismatch_message_names_both_shapes():
    with pytest.raises(UserError, match=r"\(3, 4\).*\(4, 3\)"):
        binary_metrics(np.ones((3, 4)), np.ones((4, 3)))


def test_largest_component_uses_full_connectivity():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # three voxels touching only by corners
    mask[4, 4, 4:6] = True  # two face neighbours
    expected = np.zeros_like(mask)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 2, 2] = True
    np.testing.assert_array_equal(largest_connected_component(mask), expected)


def test_largest_component_tie_keeps_the_first_in_raster_order():
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 3:5] = True
    mask[3, 0:2] = True
    expected = np.zeros_like(mask)
    expected[0, 3:5] = True
    np.testing.assert_array_equal(largest_connected_component(mask), expected)


def test_largest_component_of_empty_mask_is_empty():
    result = largest_connected_component(np.zeros((3, 4, 5), dtype=np.uint8))
    assert result.dtype == bool and result.shape == (3, 4, 5) and not result.any()


def test_keep_largest_component_per_class():
    label_map = np.zeros((8, 8), dtype=np.uint8)
    label_map[0:3, 0:3] = 1  # kept: 9 voxels
    label_map[6, 6] = 1  # removed
    label_map[5:8, 0:2] = 2  # kept: 6 voxels
    label_map[0, 7] = 2  # removed
    expected = label_map.copy()
    expected[6, 6] = expected[0, 7] = 0
    result = keep_largest_component_per_class(label_map, num_classes=3)
    assert result.dtype == label_map.dtype
    np.testing.assert_array_equal(result, expected)


def test_mean_over_cases():
    per_case = [{"dice": 0.5, "hd95": 2.0}, {"dice": 1.0, "hd95": 4.0}]
    assert mean_over_cases(per_case) == {"dice": 0.75, "hd95": 3.0}


def test_mean_over_cases_refuses_nan():
    with pytest.raises(ValueError, match="hd95.*#1"):
        mean_over_cases([{"dice": 0.5, "hd95": 2.0}, {"dice": 1.0, "hd95": float("nan")}])


def test_mean_over_cases_refuses_no_cases_and_mixed_keys():
    with pytest.raises(ValueError):
        mean_over_cases([])
    with pytest.raises(ValueError):
        mean_over_cases([{"dice": 0.5}, {"jaccard": 0.5}])
