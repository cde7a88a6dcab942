"""The app's event handlers as plain functions (no Gradio here): tests call them directly, ``ui/layout.py`` wires
them to components. Each returns values keyed by output name; the layout maps names to components."""

from __future__ import annotations

import html
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from magcache.studio.comparison import ComparisonResult, run_comparison
from magcache.studio.jobs import session_token
from magcache.studio.manager import Cancelled, ModelManager, redact
from magcache.studio.media import MediaError, confine_upload, side_by_side, to_uint8_frames, upscale_nearest, write_mp4
from magcache.studio.public import strict_values
from magcache.studio.request import GenerationRequest, InvalidRequest
from magcache.studio.tuning import SchedulePreview, message, preview_schedule

from .plots import schedule_figure

logger = logging.getLogger("magcache.studio.ui")

DISPLAY_MIN_SIDE = 256  # tiny outputs are enlarged (nearest neighbour) to at least this size for display
PHASES = {"baseline": "Baseline run", "magcache": "MagCache run", "warm-up": "Warm-up", "load": "Loading the model",
          "queue": "Waiting for the device", "calibration": "Calibration run (nothing skipped)",
          "timing": "Timing baseline and MagCache in turn"}
STEPPED = ("baseline", "magcache", "calibration")  # phases that report steps


def output_dir() -> Path:
    """Where videos are written (``MAGCACHE_OUTPUT_DIR``; default: a folder in the system temp dir)."""
    path = Path(os.environ.get("MAGCACHE_OUTPUT_DIR") or Path(tempfile.gettempdir()) / "magcache-studio")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# The live schedule preview
# --------------------------------------------------------------------------------------------------
def live_preview(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> tuple[Any, str]:
    """Redraw which steps each branch will compute, without running a model (the policy's simulation, with the
    tab's chosen ratio curve when the inputs have one)."""
    try:
        return show_preview(preview_schedule(manager, tab_id, values))
    except (KeyError, ValueError, TypeError) as e:
        return None, f"⚠️ {message(e)}"


def show_preview(p: SchedulePreview) -> tuple[Any, str]:
    """The preview's figure and the sentence under it."""
    schedule, curve, preset = p.schedule, p.curve, p.preset
    computed, total = schedule.computed_count(), schedule.num_steps * len(schedule.decisions)
    source = f"{preset.id!r} ratios" if curve is None else f"ratio curve: {curve.label}"
    text = (f"**Predicted schedule** ({source}): {computed}/{total} transformer passes computed → "
            f"**{schedule.predicted_speedup():.2f}×** on the transformer blocks (embeddings, text encoders and VAE "
            "are not sped up, so this bounds the wall-clock speed-up from above).")
    if p.tab.task == "framepack":
        text += f" FramePack runs this schedule once per section ({p.sections} section{'s' if p.sections > 1 else ''})."
    n, switch = schedule.num_steps, p.expert_switch
    if switch is not None:
        text += (f" Expert switch after step {switch - 1}: steps 0–{switch - 1} run the high-noise expert, "
                 f"{switch}–{n - 1} the low-noise one; the retention windows are placed by this switch.")
    # the preset's curve for this run length; a chosen curve's label says how it was resampled
    calibrated = len(preset.curves_for(n)[0]) if curve is None else n
    if n != calibrated:
        text += f" The ratios were calibrated for {calibrated} steps and are resampled to {n}."
    return schedule_figure(schedule, p.settings.thresh, expert_switch=switch), text


# --------------------------------------------------------------------------------------------------
# Generate / stop
# --------------------------------------------------------------------------------------------------
NUMBER_LABELS = {"height": "Height", "width": "Width", "num_frames": "Frames", "steps": "Steps", "guidance": "Guidance",
                 "seed": "Seed", "thresh": "thresh", "retention_ratio": "retention ratio", "K": "K",
                 "timing_repeats": "Timing repeats"}
UPLOADS = {"image": "input image", "control_video": "control video", "mask_video": "mask video"}


def request_from_values(tab_id: str, values: Mapping[str, Any],
                        upload_roots: Sequence[str | os.PathLike] | None = None) -> GenerationRequest:
    """Inputs (by name, as the UI delivers them: sliders give floats, empty fields give '' or None). Anything else
    a client may send (text for numbers, 8.5 steps, NaN) raises ``InvalidRequest`` naming the field. With
    ``upload_roots``, file inputs must be paths inside those folders (the app passes Gradio's upload folder)."""
    values = strict_values(values)  # text without NULs or lone surrogates, bounded paths, real booleans

    def num(name: str, cast=int):
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        label = NUMBER_LABELS.get(name, name)
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not isinstance(number, (int, float, np.integer, np.floating)):
                raise TypeError
        except (TypeError, ValueError):
            raise InvalidRequest(f"{label} must be a number, got {value!r}.") from None
        if cast is float:
            return float(number)  # NaN / inf reach the range checks, which name the field
        if isinstance(number, (int, np.integer)):
            return int(number)  # ranges are checked with the request (validate)
        if not np.isfinite(number) or not float(number).is_integer():
            raise InvalidRequest(f"{label} must be a whole number, got {value!r}.")
        return int(number)

    def upload(value: Any, what: str) -> Any:
        if isinstance(value, Mapping):  # a FileData dict from an API client
            value = value.get("path")
        if upload_roots is not None and isinstance(value, (str, os.PathLike)):
            try:
                return confine_upload(value, upload_roots, what)
            except MediaError as e:
                raise InvalidRequest(f"The {what}: {e}") from None
        return value

    refs = values.get("reference_images") or None
    if refs:
        if isinstance(refs, (str, os.PathLike, Mapping)):
            refs = [refs]
        refs = [upload(r, f"reference image {i + 1}") for i, r in enumerate(refs)]
    files = {name: upload(values.get(name) or None, what) for name, what in UPLOADS.items()}
    return GenerationRequest(
        tab_id=tab_id,
        variant=values.get("variant") or None,
        prompt=values.get("prompt") or "",
        negative_prompt=values.get("negative_prompt") or None,
        image=files["image"],
        control_video=files["control_video"],
        mask_video=files["mask_video"],
        reference_images=refs,
        height=num("height"),
        width=num("width"),
        num_frames=num("num_frames"),
        num_inference_steps=num("steps"),
        guidance_scale=num("guidance", float),
        seed=num("seed") or 0,
        thresh=num("thresh", float),
        retention_ratio=num("retention_ratio", float),
        K=num("K"),
        compare=bool(values.get("compare", True)),
        compile=bool(values.get("compile", False)),
        weights=(values.get("weights") or "").strip() or None,
        base=(values.get("base") or "").strip() or None,
        compile_backend=values.get("compile_backend"),
        timing_repeats=None if str(values.get("timing_repeats", "")).strip().lower() in ("", "auto", "none")
        else num("timing_repeats"),
        curve=values.get("curve") or None,
        curve_file=values.get("curve_file") or None,
    )


def generate(manager: ModelManager, tab_id: str, values: Mapping[str, Any], session: str = "local",
             on_progress: Callable[[str, int, int], None] | None = None, *,
             still_wanted: Callable[[], bool] | None = None,
             upload_roots: Sequence[str | os.PathLike] | None = None, client: str | None = None) -> dict[str, Any]:
    """Run a comparison and turn it into display values. Raises ``InvalidRequest`` / ``WeightsNotFound`` /
    ``OutOfMemory`` (the UI shows them as errors); a stop request returns only a status line. ``still_wanted``
    is asked at every step and while queued: False (the client went away) stops the run like Stop does.
    Before the request waits for the device, the job checks the model source, the compute budget and
    ``client``'s limit of requests (``public.admission``)."""
    req = request_from_values(tab_id, values, upload_roots)
    gone = []
    with session_token(manager, session) as token:
        progress = on_progress
        if still_wanted is not None:
            def progress(phase: str, done: int, total: int) -> None:
                if on_progress is not None:
                    on_progress(phase, done, total)
                if not token.is_set() and not still_wanted():
                    gone.append(True)
                    token.set()  # the client is gone: stop at this step, free the device for the next request
        try:
            result = run_comparison(manager, req, progress, token, client=client)
        except Cancelled as e:
            logger.info("%s: run stopped (%s)%s", tab_id, e, " - client gone or event cancelled" if gone else "")
            return {"status": f"⏹ **Stopped** ({e}). The model stays loaded; run again any time."}
    return present(result)


def error_html(message: Any) -> str:
    """An error toast's text (Gradio renders it as HTML): tokens redacted, line breaks and `code` spans readable."""
    text = html.escape(redact(str(message)))
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return text.replace("\n", "<br>")


def stop_requested(cancelled: bool) -> str:
    """The Stop button's answer for a calibration, sweep or strategies run (``ModelManager.cancel``'s result)."""
    return "⏹ Stop requested: the run says where it stopped when it ends." if cancelled else "Nothing is running."


def stop(manager: ModelManager, session: str) -> str:
    """Ask the session's run to stop; the run itself then reports after which step it stopped."""
    if manager.cancel(session):
        return "⏹ **Stopping** at the end of the current step…"
    return "Nothing is running in this tab."


def queue_text(manager: ModelManager, ahead: int) -> str:
    """What a request waiting for the device shows: which tab holds it, for how long, how many are ahead."""
    holder = manager.device_holder()
    if holder is None:
        return f"Waiting for the device ({ahead} ahead)"
    who, seconds = holder
    return (f"Waiting for the device: the {who or 'other'} tab has held it for {seconds:.0f} s"
            + (f" ({ahead} requests ahead)" if ahead > 1 else ""))


def out_of_range(label: str, value: Any, minimum: float, maximum: float) -> str | None:
    """Why a typed slider value is refused (None: it is in range): the control's own range, said next to it.
    The backend checks every request again (API clients never see the sliders)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{label} must be a number from {minimum:g} to {maximum:g}; {value!r} was not taken."
    if not np.isfinite(number) or not minimum <= number <= maximum:
        return f"{label} takes {minimum:g} to {maximum:g}; {value!r} was not taken."
    return None


def progress_text(phase: str, done: int, total: int) -> str:
    if phase == "queue":
        return f"Waiting for the device ({done} ahead)"
    if phase in STEPPED:
        return f"{PHASES[phase]}: step {done}/{total}"
    if phase == "timing":
        return f"{PHASES[phase]}: pair {done + 1} of at most {total}"
    return PHASES.get(phase, phase)


# --------------------------------------------------------------------------------------------------
# Presenting a result
# --------------------------------------------------------------------------------------------------
def present(result: ComparisonResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "result": result,
        "status": status_markdown(result),
        "headline": headline_markdown(result),
        "details": details_markdown(result),
        "timing": timing_table(result),
        "metrics": metrics_markdown(result),
        "heatmap": _display(result.heatmap) if result.heatmap is not None else None,
        "schedule": schedule_figure(result.predicted, result.settings.thresh, result.cached.stats,
                                    expert_switch=result.expert_switch),
    }
    base, cached = result.baseline, result.cached
    if result.tab.is_video:
        folder = output_dir() / f"{result.tab.id}-{uuid.uuid4().hex[:8]}"
        fps = result.tab.fps or 16
        frames_m = upscale_nearest(to_uint8_frames(cached.output), DISPLAY_MIN_SIDE)
        out["magcache_video"] = write_mp4(frames_m, folder / "magcache.mp4", fps)
        if base is not None:
            frames_b = upscale_nearest(to_uint8_frames(base.output), DISPLAY_MIN_SIDE)
            out["baseline_video"] = write_mp4(frames_b, folder / "baseline.mp4", fps)
            out["split_video"] = write_mp4(side_by_side(frames_b, frames_m), folder / "baseline_vs_magcache.mp4", fps)
        else:
            out["baseline_video"] = out["split_video"] = None
    else:
        out["magcache_image"] = _display(cached.output)
        out["baseline_image"] = _display(base.output) if base is not None else None
        out["slider"] = (out["baseline_image"], out["magcache_image"]) if base is not None else None
    return out


def _display(image: Any) -> Image.Image:
    arr = upscale_nearest(to_uint8_frames(image), DISPLAY_MIN_SIDE)[0]
    return Image.fromarray(arr)


TIMING_COLUMNS = ["Run", "Time (s)", "Speed-up", "Passes computed", "Calls"]
PASSES_HELP = ("**Passes** are runs of the transformer's block stack, one per step and branch (the uncond branch "
               "of real CFG is a second pass); MagCache skips a pass by reusing the last residual. **Calls** are "
               "the transformer's forward calls: every step still makes them (embeddings and the output layer run), "
               "so they are equal for both runs.")


def _seconds(median: float, spread: float, pairs: int) -> str:
    return f"{median:.3f} ± {spread:.3f}" if pairs > 1 else f"{median:.3f}"


def _passes(counts: Mapping[str, tuple[int, int]]) -> str:
    """"12/56 (cond 6/28, uncond 6/28)": passes computed of all branches, then per branch when there are several."""
    computed, total = sum(c for c, _ in counts.values()), sum(t for _, t in counts.values())
    if len(counts) < 2:
        return f"{computed}/{total}"
    return f"{computed}/{total} (" + ", ".join(f"{b} {c}/{t}" for b, (c, t) in counts.items()) + ")"


def timing_table(result: ComparisonResult) -> pd.DataFrame:
    """Baseline and MagCache wall times (median ± half the interquartile range over the interleaved pairs, a
    single time with one pair), the speed-up (median of the pairs' baseline / MagCache), the block-stack passes
    computed out of all (summed over branches and FramePack sections, from the run's MagCache stats) and the
    transformer's forward calls counted on the model."""
    counts = result.cached.branch_counts()
    predicted = {b: (len(result.predicted.computed.get(b, ())) * result.sections, t) for b, (_, t) in counts.items()}
    timing = result.timing
    rows = []
    if timing is not None:
        rows.append(["Baseline (no cache)", _seconds(timing.median("baseline"), timing.spread("baseline"), timing.pairs),
                     "1.00×", _passes({b: (t, t) for b, (_, t) in counts.items()}), result.baseline.transformer_calls])
        speedup = f"{timing.speedup:.2f}×" + (f" ± {timing.speedup_spread:.2f}" if timing.pairs > 1 else "")
        cached_time = _seconds(timing.median("cached"), timing.spread("cached"), timing.pairs)
    else:
        speedup, cached_time = "—", f"{result.cached.seconds:.3f}"
    rows.append(["MagCache", cached_time, speedup, _passes(counts), result.cached.transformer_calls])
    rows.append(["Predicted (policy)", "—", f"{result.predicted_speedup:.2f}× blocks", _passes(predicted), "—"])
    if timing is not None and timing.pairs > 1:
        rows.append(["First pair alone (the images)", f"{result.baseline.seconds:.3f} / {result.cached.seconds:.3f}",
                     f"{result.single_run_speedup:.2f}×", "—", "—"])
    extras = [("Model load (not timed)", result.load_seconds), ("Warm-up (not timed)", result.warmup_seconds)]
    for label, seconds in extras:
        if seconds is not None:
            rows.append([label, f"{seconds:.3f}", "—", "—", "—"])
    return pd.DataFrame(rows, columns=TIMING_COLUMNS)


def table_html(table: pd.DataFrame, css_class: str) -> str:
    """A small table as HTML whose cells carry their column's name (``data-label``): the page's stylesheet shows
    it as a table on a wide screen and as one stacked card per row on a phone."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(f'<td data-label="{html.escape(str(c))}">{html.escape(str(v))}</td>'
                                    for c, v in zip(table.columns, row)) + "</tr>"
                   for row in table.itertuples(index=False))
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def headline_markdown(result: ComparisonResult) -> str:
    """The result in one line, e.g. "3.6× faster ± 0.1 · PSNR 46 dB · SSIM 0.998 · 12 of 56 transformer passes",
    and under it how the speed-up was measured (or why it cannot be trusted)."""
    counts = result.cached.branch_counts()
    computed, total = sum(c for c, _ in counts.values()), sum(t for _, t in counts.values())
    passes = f"{computed} of {total} transformer passes"
    timing = result.timing
    if timing is None:
        return (f"### MagCache run: {result.cached.seconds:.2f} s · {passes}\n"
                "Turn on **Compare with baseline** for the speed-up and the quality.")
    spread = f" ± {timing.speedup_spread:.2f}" if timing.pairs > 1 else ""
    psnr = "identical" if result.psnr >= 100 else f"PSNR {result.psnr:.1f} dB"
    head = f"### {timing.speedup:.2f}× faster{spread} · {psnr} · SSIM {result.ssim:.3f} · {passes}"
    how = (f"Median of {timing.pairs} baseline / MagCache pair{'s' if timing.pairs > 1 else ''} timed in turn after "
           f"an untimed warm-up; skipping blocks alone predicts at most {result.predicted_speedup:.2f}×.")
    if result.timing_is_noisy:
        return f"{head}\n⚠️ **Timing uncertain: the machine is busy.** {how}"
    return f"{head}\n{how}"


def metrics_markdown(result: ComparisonResult) -> str:
    if result.baseline is None:
        return ""
    psnr = "identical (100 dB)" if result.psnr >= 100 else f"{result.psnr:.2f} dB"
    frames = " (mean over frames)" if result.tab.is_video else ""
    return (f"**PSNR** {psnr} · **SSIM** {result.ssim:.4f}{frames}: the MagCache output against the baseline with "
            "the same seed; higher = closer (SSIM 1 = identical). The map shows |baseline − MagCache| per pixel"
            f"{' of the first frame' if result.tab.is_video else ''}, scaled so the largest difference is white.")


def status_markdown(result: ComparisonResult) -> str:
    """What ran, in one line, and the warnings (provenance is in :func:`details_markdown`)."""
    s = result.settings
    lines = [f"**Done: {result.tab.label} · {result.variant.label}** · thresh {s.thresh:g}, retention "
             f"{s.retention_ratio:g}, K {s.K} · {result.num_steps} steps"
             f"{f' × {result.sections} sections' if result.sections > 1 else ''}"
             + (" · compiled blocks" if result.compiled else "")]
    if result.timing is not None and result.timing.stopped:
        lines.append(f"⏹ Stopped during the timing repeats: the result stands, timed over {result.timing.pairs} "
                     f"pair{'s' if result.timing.pairs > 1 else ''}.")
    lines += [f"ℹ️ {n}" for n in result.request_notes]
    lines += [f"⚠️ {w}" for w in result.warnings]
    return "\n\n".join(lines)


def details_markdown(result: ComparisonResult) -> str:
    """Where the result came from: model, placement, preset, ratio curve (with its source), notes."""
    branches = ", ".join(result.branches) or "cond"
    lines = [f"**Model:** {result.model}" + (f" · {result.placement}" if result.placement else ""),
             f"**Preset:** `{result.preset}` · branches: {branches}",
             f"**Ratio curve:** {result.curve.label if result.curve is not None else 'the preset curve'}"]
    lines += [f"ℹ️ {n}" for n in result.notes]
    return "\n\n".join(lines)


def system_markdown(manager: ModelManager) -> str:
    """Device, memory budget and the loaded models (least recently used first)."""
    gib = 1024**3
    loaded = manager.loaded()
    lines = [f"**Device** `{manager.device}` · **dtype** `{str(manager.dtype).replace('torch.', '')}` · "
             f"**memory budget** {manager.budget_bytes / gib:.1f} GiB · **in use** {manager.used_bytes() / gib:.2f} GiB"
             + (" · **MAGCACHE_TINY=1** (tiny offline pipelines)" if manager.tiny else "")]
    if loaded:
        lines.append("Loaded (least recently used first): " + "; ".join(
            f"`{m.plan.variant_id}` {m.bytes / gib:.2f} GiB ({m.placement.reason if m.placement else ''})"
            + (" · running, unloads when its run ends" if m.unload_when_free else "") for m in loaded))
    else:
        lines.append("No model loaded yet: each tab loads its model on its first run.")
    return "\n\n".join(lines)


def unload_all(manager: ModelManager) -> str:
    manager.unload_all()
    return system_markdown(manager)
