"""Quality of a cached output against the uncached one (same seed/prompt), in the VideoSys/TeaCache/MagCache
convention: PSNR on [0, 1] data (100 dB for identical inputs, as their ``calculate_psnr`` returns for MSE < 1e-10)
and SSIM with an 11x11 Gaussian window (sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, "valid" region), averaged over
channels and frames. Inputs: images or videos as arrays/tensors in [0, 1], shape (..., H, W, C) or PIL images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_IDENTICAL = 100.0


def to_frames(x: Any) -> torch.Tensor:
    """Float32 tensor (N, C, H, W) in [0, 1] from a PIL image, a list of them, or an array/tensor in [0, 1] with
    channels last ((H, W, C), (F, H, W, C), (B, F, H, W, C)) or a torch image batch (B, C, H, W)."""
    if isinstance(x, (list, tuple)):
        return torch.cat([to_frames(v) for v in x])
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL
        x = np.asarray(x.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim == 5:
        t = t.flatten(0, 1)
    if t.ndim != 4:
        raise ValueError(f"expected an image or video, got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    elif t.shape[-1] in (1, 3, 4) and t.shape[1] in (1, 3, 4) and t.shape[-1] != t.shape[1]:
        t = t.permute(0, 3, 1, 2)
    return t.clamp(0, 1)


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = to_frames(a), to_frames(b)
    if ta.shape != tb.shape:
        raise ValueError(f"outputs differ in shape: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return ta, tb


def psnr(a: Any, b: Any) -> float:
    ta, tb = _pair(a, b)
    values = []
    for fa, fb in zip(ta, tb):
        mse = float(torch.mean((fa.double() - fb.double()) ** 2))
        values.append(PSNR_IDENTICAL if mse < 1e-10 else 20 * math.log10(1.0 / math.sqrt(mse)))
    return float(np.mean(values))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :])[None, None]


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM; images smaller than the 11-px window use a window as large as the image allows."""
    ta, tb = _pair(a, b)
    n, c, h, w = ta.shape
    size = min(11, h, w)
    win = _gaussian_window(size, 1.5 * size / 11).to(torch.float64)
    x = ta.double().reshape(n * c, 1, h, w)
    y = tb.double().reshape(n * c, 1, h, w)
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def difference_heatmap(a: Any, b: Any, gain: float | None = None) -> np.ndarray:
    """Per-pixel |a - b| (mean over channels, first frame) as an RGB uint8 heat map (black = equal). ``gain``
    scales the difference; by default the largest difference maps to full brightness (so tiny differences are
    visible; the caption should say so)."""
    ta, tb = _pair(a, b)
    d = (ta[0] - tb[0]).abs().mean(0)
    scale = gain if gain is not None else (1.0 / float(d.max()) if float(d.max()) > 0 else 1.0)
    v = (d * scale).clamp(0, 1).numpy()
    # black -> red -> yellow -> white
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def as_array(output: Any) -> np.ndarray:
    """A pipeline output as a float32 array in [0, 1]: a PIL image as (H, W, 3), an array as it is."""
    if hasattr(output, "convert"):
        return np.asarray(output.convert("RGB"), dtype=np.float32) / 255.0
    return np.asarray(output, dtype=np.float32)


def quality(reference: Any, test: Any, chunk: int = 8) -> tuple[float, float]:
    """PSNR and SSIM of ``test`` against ``reference`` (images or videos), frame chunks at a time so long videos
    stay within memory; both are means over frames."""
    a, b = as_array(reference), as_array(test)
    if a.ndim == 3:
        a, b = a[None], b[None]
    psnrs, ssims, weights = [], [], []
    for i in range(0, len(a), chunk):
        psnrs.append(psnr(a[i:i + chunk], b[i:i + chunk]))
        ssims.append(ssim(a[i:i + chunk], b[i:i + chunk]))
        weights.append(len(a[i:i + chunk]))
    return float(np.average(psnrs, weights=weights)), float(np.average(ssims, weights=weights))
