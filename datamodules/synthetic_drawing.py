"""Drawing blocks shared by the synthetic data generators (datamodules/synthetic_*.py): seeded random streams,
smooth noise fields and shading, and 2-D / 3-D shape distances.

Every random draw of a generator comes from :func:`seeded_rng` (``numpy.random.default_rng`` seeded by (seed,
stream, index)), so a case does not change when the number of other cases changes, and the same arguments always
give the same arrays.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

#: The random stream of split orders and ids, shared by the ACDC, LA and Kvasir generators (each draws its own
#: cases from a stream of its own), so that e.g. the split order does not shift when a case's drawing changes.
SPLIT_STREAM = 1


def seeded_rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """The generator of random stream ``stream`` for case ``index`` of a data set drawn with ``seed``."""
    return np.random.default_rng([int(seed), stream, index])


def smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation: textures and irregular shapes."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="reflect")
    return field_ / (field_.std() + 1e-12)


def bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float = 0.12) -> np.ndarray:
    """Coil-sensitivity shading: a random smooth quadratic around 1 (far cheaper than filtering with a wide kernel)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    linear = sum(rng.normal(0, 1) * axis for axis in axes)
    quadratic = sum(rng.normal(0, 0.5) * axis * axis for axis in axes)
    shading = linear + quadratic
    return 1 + strength * shading / (np.abs(shading).max() + 1e-12)


def ellipse_distance(rows, cols, center, radii, angle) -> np.ndarray:
    """Normalised elliptical distance: < 1 inside, 1 on the boundary. ``angle`` rotates the first semi-axis."""
    dr, dc = rows - center[0], cols - center[1]
    c, s = math.cos(angle), math.sin(angle)
    along = dr * s + dc * c  # component along the first axis, direction (sin a, cos a) in (row, col)
    across = -dr * c + dc * s
    return np.sqrt((along / radii[0]) ** 2 + (across / radii[1]) ** 2)


def lumpy_distance(rows, cols, center, radii, angle, lumps) -> np.ndarray:
    """Elliptical distance whose boundary is pushed in and out by a few angular harmonics."""
    theta = np.arctan2(rows - center[0], cols - center[1])
    boundary = 1 + sum(amplitude * np.cos(order * theta + phase) for amplitude, phase, order in lumps)
    return ellipse_distance(rows, cols, center, radii, angle) / boundary


def random_rotation(rng: np.random.Generator, max_tilt: float) -> np.ndarray:
    """A free spin about the third axis combined with a tilt of at most ``max_tilt`` radians."""
    spin, tilt, tilt_axis = rng.uniform(0, 2 * math.pi), rng.uniform(0, max_tilt), rng.uniform(0, 2 * math.pi)
    c, s = math.cos(spin), math.sin(spin)
    spin_matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    axis = np.array([math.cos(tilt_axis), math.sin(tilt_axis), 0.0])
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt_matrix = np.eye(3) + math.sin(tilt) * cross + (1 - math.cos(tilt)) * cross @ cross  # Rodrigues
    return tilt_matrix @ spin_matrix


def ellipsoid_distance(grid: np.ndarray, center, radii, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance (< 1 inside) on a (3, X, Y, Z) coordinate grid."""
    offsets = grid - np.asarray(center, dtype=np.float64)[:, None, None, None]
    local = np.tensordot(rotation.T, offsets, axes=1)
    return np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))
