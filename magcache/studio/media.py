"""Images and videos in and out of the app: reading user uploads into what pipelines take, and writing the
comparison outputs (MP4s with imageio-ffmpeg, a split-screen MP4 of both runs so they play in sync).

Uploads are untrusted: sizes are checked before a full decode (bytes on disk, pixels from the header), every
decoder failure becomes a :class:`MediaError` that names the problem, and :func:`confine_upload` keeps paths a
client sends inside the upload folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

MAX_IMAGE_BYTES = 50 * 1024**2
MAX_IMAGE_PIXELS = 64 * 1024**2  # 8192 x 8192; a decoded RGB image of this size is 192 MiB
MAX_VIDEO_BYTES = 500 * 1024**2
MAX_VIDEO_FRAME_PIXELS = 4096 * 2160  # 4K frames; each is resized to the run's size as soon as it is read


class MediaError(ValueError):
    """An upload that cannot be used (unreadable, too large, outside the upload folder); the message says why."""


def confine_upload(path: str | os.PathLike, roots: Iterable[str | os.PathLike], what: str = "file") -> str:
    """``path`` resolved (symlinks and ``..`` included), if it lies inside one of ``roots``; else MediaError.
    The app passes Gradio's upload folder: a client can name any path, but only uploads are read."""
    real = Path(os.path.realpath(path))
    for root in roots:
        base = Path(os.path.realpath(root))
        if real == base or base in real.parents:
            return str(real)
    raise MediaError(f"the {what} {Path(str(path)).name!r} is not an uploaded file; upload it through the app")


def _file_size(path: str | os.PathLike, limit: int, what: str) -> int:
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise MediaError(f"cannot read the {what}: {e.strerror or e}") from None
    if size > limit:
        raise MediaError(f"the {what} is too large ({size / 1024**2:.0f} MiB; the limit is {limit / 1024**2:.0f} MiB)")
    if size == 0:
        raise MediaError(f"the {what} is empty")
    return size


def _check_pixels(width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise MediaError(f"the {what} is too large ({width}x{height} pixels; the limit is {limit / 1024**2:.0f} "
                         "megapixels): downscale it first")


def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """A decoded RGB image from an upload (path, PIL image or array), size-checked before the full decode."""
    if isinstance(source, Image.Image):
        _check_pixels(*source.size, max_pixels, "image")
        return source.convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        _file_size(source, max_bytes, "image file")
        try:
            with warnings.catch_warnings():
                # our own limit (checked below from the header) is stricter than PIL's warning threshold
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(source) as im:  # reads the header only
                    _check_pixels(*im.size, max_pixels, "image")
                    im.load()
                    return im.convert("RGB")
        except MediaError:
            raise
        except Image.DecompressionBombError:  # PIL refuses the header itself (over twice its own limit)
            raise MediaError(f"the image is too large (over {max_pixels / 1024**2:.0f} megapixels): downscale it "
                             "first") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise MediaError(f"cannot read the image ({type(e).__name__}: {e}); upload a PNG, JPEG or WebP "
                             "file") from None
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise MediaError(f"an image array must be HxW or HxWxC (C = 1, 3 or 4), got shape {source.shape}")
        _check_pixels(source.shape[1], source.shape[0], max_pixels, "image")
        return to_pil(source.squeeze(-1) if source.ndim == 3 and source.shape[2] == 1 else source)
    raise MediaError(f"expected an image file, got {type(source).__name__}")


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
        raise MediaError("the video has no frames")
    return (frames + [frames[-1]] * num_frames)[:num_frames]


def read_video(path: str | os.PathLike, num_frames: int, width: int, height: int, mode: str = "RGB") -> list[Image.Image]:
    """Frames of a video file (read with imageio-ffmpeg), resized to ``width`` x ``height`` and fitted to
    ``num_frames``. Only the first ``num_frames`` frames are decoded; size limits are checked first."""
    import imageio.v2 as imageio

    if not isinstance(path, (str, os.PathLike)):
        raise MediaError(f"expected a video file, got {type(path).__name__}")
    _file_size(path, MAX_VIDEO_BYTES, "video file")
    frames = []
    try:
        with imageio.get_reader(str(path), "ffmpeg") as reader:
            w, h = reader.get_meta_data().get("size") or (0, 0)
            _check_pixels(int(w), int(h), MAX_VIDEO_FRAME_PIXELS, "video")
            for frame in reader:
                frames.append(Image.fromarray(frame).convert(mode).resize((width, height), Image.BICUBIC))
                if len(frames) >= num_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - ffmpeg reports a broken file in many ways (OSError, RuntimeError, ...)
        raise MediaError(f"cannot read the video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "upload an MP4, WebM or MOV file") from None
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
