"""The random spatial warp of a demo subject (`dataset.demo`): each hemisphere's own width and length scaling, a
global per-axis scale and rotation about every axis, and a smooth random deformation; plus the smooth random
fields behind the deformation, which the demo's lumpy lesions and bias field use too.
"""
from __future__ import annotations

import numpy as np

MAX_DISPLACEMENT_MM = 10.0      # smooth deformation, at most one cycle per field of view
SCALE_RANGE = 0.12              # per-axis scale in 1 +- SCALE_RANGE
ROTATION_DEG = 12.0             # about each axis
ASYMMETRY = 0.06                # each hemisphere's width and length scaled by 1 +- ASYMMETRY on its own
HEMISPHERE_BLEND_MM = 10.0      # width of the smooth step between the hemispheres' scalings


def smooth_noise(rng: np.random.Generator, shape, max_cycles: float = 1.0, n_waves: int = 8) -> np.ndarray:
    """Smooth random field in [-1, 1]: a sum of random plane waves of at most `max_cycles` per field of view
    (each wave a separable product of complex exponentials, so the sum is one einsum)."""
    frequency = rng.uniform(-max_cycles, max_cycles, size=(n_waves, 3)) * 2 * np.pi
    weight = rng.normal(size=n_waves) * np.exp(1j * rng.uniform(0, 2 * np.pi, size=n_waves))
    waves = [np.exp(1j * frequency[:, axis, None] * np.linspace(0.0, 1.0, n)[None]).astype(np.complex64)
             for axis, n in enumerate(shape)]
    field = np.einsum("w,wi,wj,wk->ijk", weight.astype(np.complex64), *waves, optimize=True).real
    return (field / max(1e-6, float(np.abs(field).max()))).astype(np.float32)


def _rotation(angles_rad) -> np.ndarray:
    """Rotation about X, then Y, then Z."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i] = step[j, j] = np.cos(angle)
        step[i, j], step[j, i] = -np.sin(angle), np.sin(angle)
        matrix = step @ matrix
    return matrix


def sampling_coordinates(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """Voxel coordinates to sample the template at: each hemisphere's own width and length scaling, a global
    per-axis scale and rotation, plus a smooth displacement."""
    spacing = np.asarray(spacing, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    offsets = grid - centre[:, None, None, None]
    side = np.tanh(offsets[0] * spacing[0] / HEMISPHERE_BLEND_MM)  # -1 one hemisphere, +1 the other
    width, length = rng.uniform(-ASYMMETRY, ASYMMETRY, size=2)
    offsets[0] *= 1.0 + width * side
    offsets[1] *= 1.0 + length * side
    matrix = _rotation(np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, size=3))) @ np.diag(
        rng.uniform(1.0 - SCALE_RANGE, 1.0 + SCALE_RANGE, size=3))
    coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), offsets) + centre[:, None, None, None]
    for axis in range(3):
        coords[axis] += smooth_noise(rng, shape) * MAX_DISPLACEMENT_MM / float(spacing[axis])
    return coords
