"""Images and videos in and out of the app: reading user uploads into what pipelines take, and writing the
comparison outputs (MP4s with imageio-ffmpeg, a split-screen MP4 of both runs so they play in sync)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_pil(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an array (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image).convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def to_uint8_frames(frames: Any) -> np.ndarray:
    """(F, H, W, 3) uint8 from PIL images, a list of arrays or an array (float in [0, 1] or uint8)."""
    if isinstance(frames, Image.Image):
        frames = [frames]
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(to_pil(f)) for f in frames])
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


def upscale_nearest(frames: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Enlarge tiny outputs by an integer factor (nearest neighbour, so pixels stay visible as pixels)."""
    h, w = frames.shape[1:3]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    if factor == 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def fit_frames(frames: Sequence[Image.Image], num_frames: int) -> list[Image.Image]:
    """Exactly ``num_frames`` frames: truncated, or padded by repeating the last frame."""
    frames = list(frames)
    if not frames:
        raise ValueError("the video has no frames")
    return (frames + [frames[-1]] * num_frames)[:num_frames]


def read_video(path: str | os.PathLike, num_frames: int, width: int, height: int, mode: str = "RGB") -> list[Image.Image]:
    """Frames of a video file (read with imageio-ffmpeg), resized to ``width`` x ``height`` and fitted to
    ``num_frames``."""
    import imageio.v2 as imageio

    frames = []
    with imageio.get_reader(str(path), "ffmpeg") as reader:
        for frame in reader:
            frames.append(Image.fromarray(frame).convert(mode).resize((width, height), Image.BICUBIC))
            if len(frames) >= num_frames:
                break
    return fit_frames(frames, num_frames)


def write_mp4(frames: Any, path: str | os.PathLike, fps: int = 16) -> str:
    """Write H.264 MP4 (yuv420p, plays in browsers) with imageio-ffmpeg; odd sizes are padded to even."""
    import imageio.v2 as imageio

    arr = to_uint8_frames(frames)
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, pixelformat="yuv420p",
                            macro_block_size=2, ffmpeg_log_level="error") as writer:
        for frame in arr:
            writer.append_data(frame)
    return str(path)


def side_by_side(left: Any, right: Any, labels: tuple[str, str] = ("Baseline", "MagCache"), gap: int = 4) -> np.ndarray:
    """Both runs next to each other in every frame (white gap, labels at the top left of each half)."""
    a, b = to_uint8_frames(left), to_uint8_frames(right)
    if a.shape != b.shape:
        raise ValueError(f"cannot put outputs of different shapes side by side: {a.shape} vs {b.shape}")
    n, h, w, c = a.shape
    out = np.full((n, h, 2 * w + gap, c), 255, dtype=np.uint8)
    out[:, :, :w], out[:, :, w + gap:] = a, b
    if h >= 48:
        for i in range(n):
            img = Image.fromarray(out[i])
            draw = ImageDraw.Draw(img)
            for x0, text in ((0, labels[0]), (w + gap, labels[1])):
                box = draw.textbbox((x0 + 6, 4), text)
                draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
                draw.text((x0 + 6, 4), text, fill=(255, 255, 255))
            out[i] = np.asarray(img)
    return out
