"""Measuring a calibration: one run of a pipeline with nothing skipped, its ratio curves recorded per branch.

The pipeline comes from the caller (a loaded model, or one of the studio's tiny offline pipelines); the command
line is ``python -m magcache calibrate``.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from . import policy as P
from .calibration import Calibration, Resolution, average_runs, parse_calibration
from .curves import model_id, run_resolution, scheduler_label
from .presets import get_preset
from .runtime import apply, get_handle

def _output_resolution(result: Any) -> Resolution | None:
    from .metrics import to_frames

    out = getattr(result, "images", None)
    if out is None:
        out = getattr(result, "frames", None)
    if out is None:
        return None
    try:
        frames = to_frames(out[0] if hasattr(out, "__len__") and len(out) == 1 else out)
    except (ValueError, TypeError):
        return None
    n, _, h, w = frames.shape
    return Resolution(int(h), int(w), int(n))

@contextlib.contextmanager
def new_runs_of(handle: Any) -> Iterator[list]:
    """Collects the runs a handle records inside the ``with`` block (the handle keeps a bounded list, so runs are
    told apart by identity, not by index; the earlier ones are kept alive so no id is reused)."""
    earlier = list(handle.runs)
    known = {id(r) for r in earlier}
    collected: list = []
    try:
        yield collected
    finally:
        collected.extend(r for r in handle.runs if id(r) not in known)

def calibrate(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    preset: str | None = None,
    *,
    model: str | None = None,
    source: str = "",
) -> Calibration:
    """Run ``pipe(**call_kwargs)`` once with nothing skipped and return the measured curves (not saved; see
    :meth:`CalibrationStore.save`). A MagCache handle already on the pipeline is reused and left as it was (its
    stats keep the calibration run); otherwise one is applied for the run and removed afterwards. ``preset`` is
    recorded with the calibration (default: the handle's, i.e. the model's default preset)."""
    steps = call_kwargs.get("num_inference_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError("calibration needs num_inference_steps >= 2 in call_kwargs")
    if preset is not None:
        get_preset(preset)  # unknown ids fail before the model runs
    handle = get_handle(pipe)
    own_handle = handle is None
    if own_handle:
        handle = apply(pipe, preset, calibrate=True)
    else:
        previous = (handle.calibrate, handle.enabled)
        handle.configure(calibrate=True, enabled=True)
    try:
        with new_runs_of(handle) as new_runs:
            result = pipe(**call_kwargs)
        new_runs = [r for r in new_runs if r.calibrating and r.completed]
    finally:
        if own_handle:
            handle.remove()
        else:
            handle.configure(calibrate=previous[0], enabled=previous[1])
    if not new_runs:
        raise RuntimeError("the calibration call recorded no completed MagCache run; is this a supported pipeline?")
    runs = [r for r in new_runs if r.num_steps == new_runs[-1].num_steps]
    branches = {name: curves for name, curves in average_runs(runs).items() if name in P.BRANCH_NAMES}
    resolution = run_resolution(pipe, call_kwargs) or _output_resolution(result)
    if resolution is None:
        raise ValueError("cannot tell the output size of the calibration run; pass height and width")
    cal = Calibration(
        model=model or model_id(pipe),
        preset=preset or handle.preset.id,
        num_steps=runs[-1].num_steps,
        resolution=resolution,
        scheduler=scheduler_label(pipe.scheduler),
        branches=branches,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=source or f"magcache calibrate: {type(pipe).__name__}, {len(runs)} run(s) averaged",
        runs=len(runs),
    )
    return parse_calibration(cal.to_dict())  # the same checks as a file read from disk
