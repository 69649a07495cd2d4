"""Image-quality and distribution metrics, each with its settings stated.

Conventions that the published code of this field got wrong and that the tests pin down:
- every intensity metric takes an explicit `data_range` (2.0 for data scaled to [-1, 1]; the window width in
  native units, e.g. 2000 for HU in [-1000, 1000]);
- the 3D SSIM window is a normalised Gaussian (it sums to 1);
- PSNR of identical volumes is +inf (not capped); callers write it as the string "inf" in JSON;
- Dice is per class with background (class 0) excluded; a class absent from both maps gives NaN and is left out
  of the mean;
- the Fréchet distance is computed from each set's own mean and covariance.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Wang, Simoncelli & Bovik (2003): weights of the five MS-SSIM scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_K1, SSIM_K2 = 0.01, 0.03
DEFAULT_KERNEL_SIZE, DEFAULT_SIGMA = 11, 1.5
MS_SSIM_MIN_AUTO_KERNEL = 7  # automatic MS-SSIM keeps at least this window, trading scales for it


def _as_tensor(volume) -> torch.Tensor:
    """(X, Y, Z) array or tensor -> float64 tensor (1, 1, X, Y, Z)."""
    t = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    if t.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)[None, None]


def _check_pair(real, fake, data_range: float) -> None:
    if tuple(np.shape(real)) != tuple(np.shape(fake)):
        raise ValueError(f"shape mismatch: {tuple(np.shape(real))} vs {tuple(np.shape(fake))}")
    if not (data_range is not None and float(data_range) > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Odd-sized 1D Gaussian normalised to sum 1 (so the separable 3D window also sums to 1)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_window_3d(kernel_size: int, sigma: float) -> torch.Tensor:
    k = gaussian_kernel_1d(kernel_size, sigma)
    return k[:, None, None] * k[None, :, None] * k[None, None, :]


def _filter_valid(x: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the three spatial axes, 'valid' region only (no padding)."""
    channels = x.shape[1]
    k = kernel_1d.to(x)
    size = k.numel()
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = size
        weight = k.reshape(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        x = F.conv3d(x, weight, groups=channels)
    return x


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, data_range: float, kernel_size: int, sigma: float):
    """Per-voxel SSIM and contrast-structure maps over the valid region of (1, 1, X, Y, Z) tensors."""
    kernel = gaussian_kernel_1d(kernel_size, sigma)
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(stacked, kernel).unbind(dim=1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    cs = (2 * cov_xy + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return luminance * cs, cs


def _valid_mask(mask, kernel_size: int) -> torch.Tensor | None:
    """The mask at the centre voxel of every valid window position."""
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask)).bool()
    r = (kernel_size - 1) // 2
    return m[r : m.shape[0] - r, r : m.shape[1] - r, r : m.shape[2] - r]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    values = values.squeeze(0)
    if mask is None:
        return float(values.mean())
    if not mask.any():
        return float("nan")
    return float(values[mask].mean())


def _from_low(volume, low: float | None) -> torch.Tensor:
    """Intensities measured from the low end of the data range. SSIM's luminance term 2 mu_x mu_y / (mu_x^2 +
    mu_y^2) assumes non-negative intensities: on signed data ([-1, 1], HU) two local means of opposite sign make
    it negative, so windows of tissue near 0 (e.g. soft tissue in HU) score below windows of noise."""
    tensor = _as_tensor(volume)
    return tensor if low is None else tensor - float(low)


def ssim3d(real, fake, *, data_range: float, low: float | None = None, kernel_size: int = DEFAULT_KERNEL_SIZE,
           sigma: float = DEFAULT_SIGMA, mask=None) -> float:
    """Mean 3D SSIM with a Gaussian window (sum 1), constants K1=0.01, K2=0.03 times `data_range`, on intensities
    measured from `low` (the low end of the data range, e.g. -1 for [-1, 1]; None: as given, as skimage and
    MONAI compute it).

    The kernel shrinks (odd, sigma scaled with it) when a side is smaller than `kernel_size`. With `mask`, the
    mean is taken over window centres inside the mask."""
    _check_pair(real, fake, data_range)
    size = fit_kernel(kernel_size, min(np.shape(real)))
    sigma = sigma * size / kernel_size
    ssim_map, _ = _ssim_maps(_from_low(real, low), _from_low(fake, low), float(data_range), size, sigma)
    return _masked_mean(ssim_map, _valid_mask(mask, size))


def fit_kernel(kernel_size: int, smallest_side: int) -> int:
    """The largest odd window <= kernel_size that fits the smallest side."""
    size = min(kernel_size, smallest_side)
    return size if size % 2 == 1 else size - 1


def ms_ssim_settings(shape, kernel_size: int | None = None, scales: int | None = None) -> tuple[int, int]:
    """(kernel_size, scales) for MS-SSIM on a volume of `shape`.

    Automatic choice: the most scales (up to 5) for which the coarsest level (each scale halves every side)
    still holds an odd window of at least 7 voxels, capped at 11; e.g. 32 slices -> 3 scales, window 7;
    176 voxels a side -> 5 scales, window 11. Given values are checked against the shape."""
    smallest = min(shape)
    if scales is None:
        scales = 1
        for candidate in range(len(MS_SSIM_WEIGHTS), 0, -1):
            coarsest = smallest // 2 ** (candidate - 1)
            if fit_kernel(kernel_size or DEFAULT_KERNEL_SIZE, coarsest) >= MS_SSIM_MIN_AUTO_KERNEL:
                scales = candidate
                break
    if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise ValueError(f"MS-SSIM scales must be in 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    coarsest = smallest // 2 ** (scales - 1)
    if kernel_size is None:
        kernel_size = fit_kernel(DEFAULT_KERNEL_SIZE, coarsest)
    if kernel_size < 1 or kernel_size % 2 == 0 or kernel_size > coarsest:
        raise ValueError(
            f"MS-SSIM window {kernel_size} does not fit shape {tuple(shape)} at {scales} scales "
            f"(coarsest side {coarsest}); use an odd window <= {coarsest} or fewer scales"
        )
    return kernel_size, scales


def ms_ssim3d(real, fake, *, data_range: float, low: float | None = None, kernel_size: int | None = None,
              scales: int | None = None, mask=None) -> float:
    """3D multi-scale SSIM (Wang et al. 2003): contrast-structure terms at the finer scales, full SSIM at the
    coarsest, weighted by the first `scales` standard weights renormalised to sum 1. Each scale halves every
    side with 2x2x2 average pooling. Negative terms are clipped to 0 before the fractional powers. Window sigma
    is 1.5 * kernel_size / 11. With `mask`, every scale averages over window centres in the pooled mask.
    `low`: as in `ssim3d` (the luminance term enters at the coarsest scale)."""
    _check_pair(real, fake, data_range)
    kernel_size, scales = ms_ssim_settings(np.shape(real), kernel_size, scales)
    sigma = DEFAULT_SIGMA * kernel_size / DEFAULT_KERNEL_SIZE
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    x, y = _from_low(real, low), _from_low(fake, low)
    m = None if mask is None else torch.as_tensor(np.asarray(mask)).to(torch.float64)[None, None]
    terms = []
    for level in range(scales):
        ssim_map, cs_map = _ssim_maps(x, y, float(data_range), kernel_size, sigma)
        level_mask = None if m is None else _valid_mask(m[0, 0] > 0.5, kernel_size)
        use = ssim_map if level == scales - 1 else cs_map
        terms.append(max(_masked_mean(use, level_mask), 0.0))
        if level < scales - 1:
            x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
            if m is not None:
                m = F.avg_pool3d(m, 2)
    values = torch.tensor(terms, dtype=torch.float64)
    if torch.isnan(values).any():
        return float("nan")
    return float(torch.prod(values**weights))


def _masked_diff(real, fake, mask) -> np.ndarray:
    diff = np.asarray(fake, dtype=np.float64) - np.asarray(real, dtype=np.float64)
    if mask is not None:
        diff = diff[np.asarray(mask, dtype=bool)]
    return diff


def mse(real, fake, *, mask=None) -> float:
    diff = _masked_diff(real, fake, mask)
    return float(np.mean(diff**2)) if diff.size else float("nan")


def rmse(real, fake, *, mask=None) -> float:
    return math.sqrt(mse(real, fake, mask=mask)) if _masked_diff(real, fake, mask).size else float("nan")


def mae(real, fake, *, mask=None) -> float:
    diff = _masked_diff(real, fake, mask)
    return float(np.mean(np.abs(diff))) if diff.size else float("nan")


def psnr(real, fake, *, data_range: float, mask=None) -> float:
    """10 log10(data_range^2 / MSE) in dB; +inf for identical volumes."""
    _check_pair(real, fake, data_range)
    error = mse(real, fake, mask=mask)
    if math.isnan(error):
        return float("nan")
    if error == 0.0:
        return float("inf")
    return 10.0 * math.log10(float(data_range) ** 2 / error)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of an (N, D) feature matrix, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N>=2, D) feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

    Uses symmetric eigen-decompositions in float64 (tr sqrt(S1 S2) equals the trace of the square root of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2), so there is no complex part to discard and rank-deficient
    covariances (fewer samples than features) are fine; tiny negative eigenvalues from round-off are clipped."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def frechet_distance_from_features(real_features, fake_features) -> float:
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


def median_bandwidth(x, y) -> float:
    """Median of the pairwise Euclidean distances in the pooled set (the 'median heuristic')."""
    pooled = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    d2 = _squared_distances(pooled, pooled)
    upper = d2[np.triu_indices(len(pooled), k=1)]
    value = float(np.sqrt(np.median(upper))) if upper.size else 0.0
    return value if value > 0 else 1.0


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.clip(d2, 0.0, None)


def mmd_squared(x, y, *, bandwidth: float) -> float:
    """Unbiased estimate of MMD^2 with the Gaussian kernel exp(-||a - b||^2 / (2 bandwidth^2)).

    Can be slightly negative for two samples of one distribution (it is unbiased); needs >= 2 rows each."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least two samples in each set")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    scale = 2.0 * float(bandwidth) ** 2
    k_xx = np.exp(-_squared_distances(x, x) / scale)
    k_yy = np.exp(-_squared_distances(y, y) / scale)
    k_xy = np.exp(-_squared_distances(x, y) / scale)
    n, m = len(x), len(y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def dice_per_class(prediction, target, num_classes: int) -> dict[int, float]:
    """Dice 2|P∩T| / (|P| + |T|) for classes 1..num_classes-1 (background 0 excluded).

    A class absent from both maps gets NaN (nothing to agree on) and is ignored by `mean_dice`."""
    p, t = np.asarray(prediction), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
    scores = {}
    for cls in range(1, num_classes):
        in_p, in_t = p == cls, t == cls
        total = int(in_p.sum()) + int(in_t.sum())
        scores[cls] = float("nan") if total == 0 else 2.0 * int((in_p & in_t).sum()) / total
    return scores


def mean_dice(scores: dict[int, float]) -> float:
    values = [v for v in scores.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
