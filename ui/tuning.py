"""The tuning panel of every tab (issue 7): which ratio curve a run uses, a speed-up target, one-click calibration,
a thresh x K sweep and export / load of the settings.

Two halves, like the rest of ``ui/``: plain functions (no Gradio; tests call them on tiny pipelines) and
:func:`build_tuning`, which ``ui/layout.py`` calls once per tab to add the "Tuning" accordion. The work is done by
the tuning backend: :mod:`magcache.calibration` (calibrate, store, best match), :mod:`magcache.studio.sweep`
(target solver, sweep, Pareto plot) and :mod:`magcache.export`.

The ratio curve is chosen in one place, :func:`pick_curve`, for the live preview, the speed-up solver, the export
and (through ``GenerationRequest.curve_picker``) the cached run of the comparison and the sweep, so the preview and
the run cannot disagree. Choices: ``auto`` (the best-matching calibration in the user store: exact, else the
nearest, resampled; else the preset curve), ``preset``, ``calibration:<id>`` (one stored calibration, picked by
hand) and ``file`` (the curve of a loaded settings JSON).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import gradio as gr  # only build_tuning uses it; the event functions' annotations (gr.Request, ...) need it here
import pandas as pd

import magcache
from magcache import policy as P
from magcache.calibration import (MAX_FILE_BYTES, Calibration, Match, as_resolution, calibration_figure,
                                  choose_curves, read_calibration_file, rules_for_calibration, run_resolution,
                                  scheduler_label)
from magcache.export import SettingsSnapshot, export_all, extra_options, load_settings_json
from magcache.presets import Preset, get_preset
from magcache.studio import public
from magcache.studio.compare import (InvalidRequest, build_call_kwargs, framepack_sections, reset_pipeline,
                                     tab_defaults, validate)
from magcache.studio.manager import Cancelled, LoadedModel, LoadPlan, ModelManager, WeightsNotFound
from magcache.studio.sweep import (DEFAULT_MAX_POINTS, PipelineSweep, SweepResult, pareto_figure, pareto_front,
                                   predictor, run_sweep, solve_for_speedup, sweep_grid)

from . import handlers

CURVE_AUTO, CURVE_PRESET, CURVE_FILE = "auto", "preset", "file"
CALIBRATION_PREFIX = "calibration:"
MAX_SWEEP_POINTS = DEFAULT_MAX_POINTS
EXPORT_FORMATS = {"comfyui": "ComfyUI-MagCache node values", "python": "magcache Python snippet",
                  "diffusers": "diffusers MagCacheConfig snippet (with caveats)", "json": "Settings JSON (with the curve)"}
EXPORT_LANGUAGES = {"comfyui": None, "python": "python", "diffusers": "python", "json": "json"}
# Inputs the preview, the solver and the export read (cheap values: no uploads).
LIGHT_INPUTS = ("variant", "steps", "thresh", "retention_ratio", "K", "guidance", "num_frames", "width", "height",
                "weights", "base", "curve", "curve_file")
Progress = Callable[[str, int, int], None]  # (text, done, total)


# --------------------------------------------------------------------------------------------------
# Which ratio curve
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TabCurve:
    """The ratio curve a run uses, what ``magcache.apply(curves=, rules=, **options)`` needs, and where it came
    from (``label``: one sentence for the UI)."""

    mode: str
    curves: list[list[float]]
    rules: P.Rules
    label: str
    how: str | None = None  # "exact" / "nearest (...)" / "chosen by hand" / "settings file"; None: preset curve
    calibration: Calibration | None = None
    options: dict = field(default_factory=dict)  # Settings fields beyond thresh / retention / K (settings file)
    model: str = ""


class _NoCalibrations:
    """A store with nothing in it: ``choose_curves`` then returns the preset curve with its usual label."""

    def best_match(self, *args: Any, **kwargs: Any) -> Match:
        return Match(None, None)


def model_key(plan: LoadPlan) -> str:
    """The name calibrations of a tab's model are stored under: ``tiny:<kind>`` for tiny pipelines (as
    ``python -m magcache calibrate --tiny KIND`` names them), else the weights' hub id or resolved local path (as
    :func:`magcache.calibration.model_id` names a loaded pipeline); for a transformer loaded on top of a base
    pipeline, the transformer's."""
    if plan.kind == "tiny":
        return f"tiny:{plan.tiny_kind}"
    source = plan.transformer_source if plan.kind in ("transformer+base", "single_file") else plan.pipeline_source
    source = str(source or plan.variant_id)
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _same_family(preset_id: str, tab_preset: Preset, what: str) -> None:
    other = get_preset(preset_id)
    if other.family and tab_preset.family and other.family != tab_preset.family:
        raise ValueError(f"{what} is for preset {other.id!r} ({other.family} models); this tab runs "
                         f"{tab_preset.id!r} ({tab_preset.family} models)")


def pick_curve(preset_id: str, mode: str | None, model: str, num_steps: int, resolution: Any, scheduler: str | None,
               cfg: bool, settings_file: str | None = None, store: Any = None) -> TabCurve:
    """The ratio curve for a run of ``model`` (``num_steps``, ``resolution``, ``scheduler``, CFG on/off) under the
    tab's curve choice ``mode``. Raises ``ValueError`` / ``KeyError`` with a message for the user."""
    p = get_preset(preset_id)
    mode = mode or CURVE_AUTO
    store = store if store is not None else public.calibration_store()
    if mode == CURVE_FILE:
        if not settings_file:
            raise ValueError("no settings file is loaded: load one under Export / load, or choose another curve")
        snapshot = load_settings_json(settings_file)
        _same_family(snapshot.preset, p, "the loaded settings file")
        curves = snapshot.effective_curves
        source = snapshot.curve_source or f"preset {snapshot.preset!r} curve"
        resampled = f", resampled from {len(curves[0])} steps" if len(curves[0]) != num_steps else ""
        return TabCurve(mode, curves, snapshot.effective_rules, f"settings file ({source}{resampled})",
                        "settings file", None, extra_options(snapshot.settings), model)
    if mode.startswith(CALIBRATION_PREFIX):
        cal = store.load(mode[len(CALIBRATION_PREFIX):])
        _same_family(cal.preset, p, f"calibration {cal.id}")
        how = "chosen by hand" + (f", resampled from {cal.num_steps} steps" if cal.num_steps != num_steps else "")
        return TabCurve(mode, cal.curves_for(cfg), rules_for_calibration(p.rules),
                        f"calibration {cal.id} ({how}): {cal.label()}", how, cal, {}, model)
    if mode not in (CURVE_AUTO, CURVE_PRESET):
        raise ValueError(f"unknown ratio curve choice {mode!r}")
    choice = choose_curves(p, model, num_steps, resolution, scheduler, cfg,
                           store if mode == CURVE_AUTO else _NoCalibrations())
    return TabCurve(mode, choice.curves, choice.rules, choice.label, choice.how, choice.calibration, {}, model)


@dataclass
class _TabRun:
    """What a tab's current inputs describe, without running anything."""

    tab: Any
    variant: str | None
    defaults: dict
    plan: LoadPlan
    preset: Preset
    steps: int
    guidance: float | None
    branches: int
    loaded: LoadedModel | None


def _loaded(manager: ModelManager, key: str) -> LoadedModel | None:
    return next((m for m in manager.loaded() if m.key == key and m.pipe is not None), None)


def _tab_run(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> _TabRun:
    tab = manager.catalog.tab(tab_id)
    variant = values.get("variant") or None
    d = tab_defaults(manager, tab.id, variant)
    # Public mode: the catalog's model only (a visitor's path is never even looked at).
    weights, base = (None, None) if public.public_mode() else (values.get("weights"), values.get("base"))
    try:
        plan = manager.plan(tab.id, variant, weights, base)
    except (WeightsNotFound, OSError, ValueError):  # a bad path shows when the tab runs; preview the default
        plan = manager.plan(tab.id, variant)
    steps = values.get("steps")
    steps = int(steps if steps not in (None, "") else d["num_inference_steps"])
    if steps < 2:
        raise ValueError("steps must be at least 2")
    guidance = values.get("guidance")
    guidance = float(guidance) if guidance not in (None, "") else d.get("guidance_scale")
    return _TabRun(tab, variant, d, plan, get_preset(plan.preset), steps, guidance, tab.num_branches(guidance),
                   _loaded(manager, plan.key))


def _size_kwargs(run: _TabRun, values: Mapping[str, Any]) -> dict:
    """Height / width / frames as ``build_call_kwargs`` passes them to the pipeline."""
    tab, d = run.tab, run.defaults
    out: dict[str, Any] = {}
    h = values.get("height") or d.get("height")
    w = values.get("width") or d.get("width")
    if h and w and ("size" in tab.inputs or run.plan.kind == "tiny"):
        out["height"], out["width"] = int(h), int(w)
    if "frames" in tab.inputs:
        out["num_frames"] = int(values.get("num_frames") or d.get("num_frames") or 1)
    return out


def current_curve(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> TabCurve:
    """The curve a run with these inputs would use (for the preview, the solver and the export). When the model is
    loaded, resolution and scheduler come from it exactly as for the run; before that, the scheduler is not known
    and matches any."""
    run = _tab_run(manager, tab_id, values)
    size = _size_kwargs(run, values)
    if run.loaded is not None:
        resolution = run_resolution(run.loaded.pipe, size)
        scheduler = scheduler_label(run.loaded.pipe.scheduler)
    else:
        resolution, scheduler = None, None
    if resolution is None:
        resolution = as_resolution((size.get("height", 1024), size.get("width", 1024), size.get("num_frames", 1)))
    return pick_curve(run.preset.id, values.get("curve"), model_key(run.plan), run.steps, resolution, scheduler,
                      run.branches > 1, values.get("curve_file"))


def curve_picker(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> Callable[[LoadedModel, dict], TabCurve]:
    """``GenerationRequest.curve_picker``: picks the curve once the model is loaded, from the real call."""
    mode, settings_file = values.get("curve") or CURVE_AUTO, values.get("curve_file")

    def pick(loaded: LoadedModel, call: dict) -> TabCurve:
        tab = manager.catalog.tab(tab_id)
        pipe = loaded.pipe
        resolution = run_resolution(pipe, call) or as_resolution((1024, 1024))
        try:
            return pick_curve(loaded.preset, mode, model_key(loaded.plan), int(call["num_inference_steps"]), resolution,
                              scheduler_label(pipe.scheduler), tab.num_branches(call.get(tab.guidance_arg)) > 1,
                              settings_file)
        except (KeyError, ValueError) as e:
            raise InvalidRequest(f"Ratio curve: {_message(e)}") from None

    return pick


def prepare_values(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> dict:
    """Generate's values with the tab's curve choice turned into a ``curve_picker`` (``TabContext.prepare_values``)."""
    return {**values, "curve_picker": curve_picker(manager, tab_id, values)}


def curve_options(manager: ModelManager, tab_id: str, variant: str | None = None,
                  with_file: bool = False) -> list[tuple[str, str]]:
    """Choices of the "Ratio curve" dropdown: auto, preset, a loaded settings file, and every stored calibration
    of the tab's model family (newest first)."""
    preset = get_preset(tab_defaults(manager, tab_id, variant)["preset"])
    out = [("Auto: the best-matching calibration, else the preset curve", CURVE_AUTO),
           (f"Preset curve ({preset.id}, published)", CURVE_PRESET)]
    if with_file:
        out.append(("Curve of the loaded settings file", CURVE_FILE))
    for cal in public.calibration_store().list():
        try:
            _same_family(cal.preset, preset, "")
        except ValueError:
            continue
        out.append((f"Calibration: {cal.label()}", CALIBRATION_PREFIX + cal.id))
    return out


# --------------------------------------------------------------------------------------------------
# Live preview and speed-up target
# --------------------------------------------------------------------------------------------------
def preview(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> tuple[Any, str]:
    """The live schedule preview with the tab's chosen curve (``handlers.preview`` draws it)."""
    try:
        curve = current_curve(manager, tab_id, values)
    except (KeyError, ValueError, TypeError) as e:
        return None, f"⚠️ Ratio curve: {_message(e)}"
    d = tab_defaults(manager, tab_id, values.get("variant") or None)
    return handlers.preview(manager, tab_id, values.get("variant") or None, values.get("steps"), values.get("thresh"),
                            values.get("retention_ratio"), values.get("K"), values.get("guidance"),
                            values.get("num_frames", d.get("num_frames")), curve=curve)


def solve_target(manager: ModelManager, tab_id: str, values: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """Thresh and K that reach ``target`` (predicted block speed-up) with the current curve, retention and steps."""
    try:
        run = _tab_run(manager, tab_id, values)
        curve = current_curve(manager, tab_id, values)
        settings = run.preset.settings(thresh=float(values["thresh"]), retention_ratio=float(values["retention_ratio"]),
                                       K=int(values["K"]), **curve.options)
        solution = solve_for_speedup(curve.curves, run.steps, float(target), settings, curve.rules, run.branches)
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidRequest(f"Speed-up target: {_message(e)}") from None
    mark = "✅" if solution.reached else "⚠️"
    text = f"{mark} {solution.explanation} Ratio curve: {curve.label}."
    return {"thresh": solution.settings.thresh, "K": solution.settings.K, "text": text, "solution": solution}


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def _request(manager: ModelManager, tab_id: str, values: Mapping[str, Any], upload_roots: Any = None):
    """The validated request of the tab's inputs (uploads confined to ``upload_roots`` when given)."""
    req = handlers.request_from_values(tab_id, values, upload_roots)
    public.check_source(req.weights, req.base)
    tab = manager.catalog.tab(tab_id)
    variant = tab.variant(req.variant)
    defaults = tab_defaults(manager, tab.id, variant.id)
    public.check_budget(tab, public.request_work(tab, req, defaults, runs=1), manager.device)  # one run at a time
    return tab, variant, validate(tab, req, defaults)


@contextlib.contextmanager
def _model_for(manager: ModelManager, tab: Any, variant: Any, req: Any, progress: Progress):
    """The loaded model for one calibration or sweep (kept loaded while it runs), left clean afterwards however
    the run ended (``compare.reset_pipeline``: no MagCache handle or residual, no pending interrupt)."""
    status = lambda msg: progress("Loading the model", 0, 1)  # noqa: E731
    with manager.use(tab.id, variant.id, req.weights, req.base, on_status=status) as loaded:
        try:
            yield loaded
        finally:
            reset_pipeline(loaded.pipe)


def _eager_unless_compiled(loaded: LoadedModel):
    """Calibrations and sweeps run the blocks eagerly on a model compiled earlier (no recompiles for new shapes)."""
    import torch

    return torch.compiler.set_stance("force_eager") if loaded.compiled else contextlib.nullcontext()


def calibrate(manager: ModelManager, tab_id: str, values: Mapping[str, Any], session: str = "local",
              on_progress: Progress | None = None, upload_roots: Any = None) -> dict[str, Any]:
    """Run the tab's model once with nothing skipped at the tab's steps, size and scheduler (through the device
    queue, stoppable), save the measured curves to the user store and return them with their plot."""
    import torch

    from magcache.calibration import calibrate as measure

    progress = on_progress or (lambda text, done, total: None)
    tab, variant, req = _request(manager, tab_id, values, upload_roots)
    token = manager.cancel_token(session)
    done = 0
    try:
        with manager.device_slot(token, on_wait=lambda ahead: progress(f"Waiting for the device ({ahead} ahead)", 0, 1)), \
                _model_for(manager, tab, variant, req, progress) as loaded:
            pipe = loaded.pipe
            call = build_call_kwargs(tab, variant, loaded, req)
            sections = framepack_sections(call["num_frames"], call.get("latent_window_size", 9)) if tab.task == "framepack" else 1
            total = call["num_inference_steps"] * sections

            def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
                nonlocal done
                done += 1
                progress(f"Calibration run (nothing skipped): step {min(done, total)}/{total}", min(done, total), total)
                if token.is_set():
                    p._interrupt = True  # the pipeline skips its remaining steps
                return {}

            call.update(generator=torch.Generator("cpu").manual_seed(int(req.seed)), callback_on_step_end=on_step_end)
            magcache.remove(pipe)  # never calibrate through a leftover handle
            progress(f"Calibration run (nothing skipped): step 0/{total}", 0, total)
            source = f"MagCache Studio, {tab.label} tab ({variant.label}): seed {req.seed}, prompt {req.prompt[:200]!r}"
            with _eager_unless_compiled(loaded):
                try:
                    cal = measure(pipe, call, loaded.preset, model=model_key(loaded.plan), source=source)
                except RuntimeError:
                    if token.is_set():  # interrupted: the run did not complete, so nothing was recorded
                        raise Cancelled(f"stopped during the calibration run after step {done} of {total}") from None
                    raise
            if token.is_set():
                raise Cancelled(f"stopped during the calibration run after step {done} of {total}")
        store = public.calibration_store()
        cal = store.save(cal)
    except Cancelled as e:
        return {"status": f"⏹ **Calibration stopped** ({e}). Nothing was saved.", "calibration": None, "figure": None}
    finally:
        manager.release_token(session, token)
    preset = get_preset(loaded.preset)
    curves = ", ".join(f"{b}: ratio {min(c['mag_ratios'][1:]):.3f}–{max(c['mag_ratios'][1:]):.3f}"
                       for b, c in cal.branches.items())
    status = (f"✅ **Calibrated** `{cal.model}` at {cal.num_steps} steps, {cal.resolution.label()}, {cal.scheduler}, "
              f"{'CFG' if cal.cfg else 'no CFG'} ({curves}). Saved as `{cal.id}` in `{store.root}`.\n\n"
              "With *Ratio curve: Auto*, runs with these settings now use it (exact match); other step counts or "
              "sizes use the nearest calibration, resampled. The plot shows it over the preset's reference curve.")
    return {"status": status, "calibration": cal, "figure": calibration_figure(cal, preset)}


def _read_upload(path: Any, what: str) -> bytes:
    """An uploaded file's bytes (Gradio's temp copy), refusing large files before reading them."""
    if isinstance(path, Mapping):
        path = path.get("path")
    if not path:
        raise ValueError(f"no {what} was uploaded")
    p = Path(str(path))
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"the {what} is too large ({size} bytes; the limit is {MAX_FILE_BYTES})")
    return p.read_bytes()


def import_calibration(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """Validate an uploaded calibration JSON and copy it into the store (nothing is written if it is bad, or if it
    belongs to another model family). Its curve is used automatically when it is the best match for this tab's
    model, or selected by hand when it was measured on another model."""
    try:
        run = _tab_run(manager, tab_id, values)
        if path is None:
            raise ValueError("no calibration file was uploaded")
        cal = read_calibration_file(path if not isinstance(path, Mapping) else path.get("path"))
        _same_family(cal.preset, run.preset, f"this calibration ({cal.model})")
        saved = public.calibration_store().import_file(path if not isinstance(path, Mapping) else path.get("path"))
    except (KeyError, OSError, ValueError) as e:
        raise InvalidRequest(f"Calibration not imported: {_message(e)}") from None
    key = model_key(run.plan)
    if saved.model == key:
        curve = CURVE_AUTO
        note = "It is this tab's model, so *Auto* uses it whenever it is the best match."
    else:
        curve = CALIBRATION_PREFIX + saved.id
        note = (f"It was measured on `{saved.model}`, this tab runs `{key}`: it is now selected by hand in *Ratio "
                "curve* (choose *Auto* to go back).")
    status = f"✅ **Imported** `{saved.id}` ({saved.label()}). {note}"
    return {"status": status, "curve": curve, "calibration": saved}


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------
def parse_list(text: Any, cast: type, what: str) -> list:
    """``"0.05, 0.1 0.2"`` -> ``[0.05, 0.1, 0.2]``; a clear message for anything that is not a number."""
    out = []
    for token in re.split(r"[,;\s]+", str(text or "").strip()):
        if not token:
            continue
        try:
            value = float(token)
            if cast is int:
                if value != int(value):
                    raise ValueError
                value = int(value)
        except ValueError:
            raise InvalidRequest(f"Sweep: {what} must be {'whole ' if cast is int else ''}numbers separated by "
                                 f"commas, got {token!r}.") from None
        out.append(value)
    return out


def mark_pareto(result: SweepResult, axis: str = "measured", quality: str = "psnr") -> SweepResult:
    """Re-mark the Pareto front for the chosen speed-up axis and quality metric."""
    front = set(pareto_front(result.rows, axis, quality))
    for i, row in enumerate(result.rows):
        row.pareto = i in front
    result.speedup_axis = axis
    return result


def sweep_view(result: SweepResult, axis: str = "measured", quality: str = "psnr") -> dict[str, Any]:
    """Table, Pareto plot and point choices of a sweep result."""
    mark_pareto(result, axis, quality)
    headers, rows = result.table()
    table = pd.DataFrame(rows, columns=headers)
    table.insert(0, "#", list(range(1, len(rows) + 1)))
    choices = []
    for i, row in enumerate(result.rows):
        speed = row.measured_speedup if axis == "measured" else (row.predicted_speedup or row.actual_block_speedup)
        quality_text = f"PSNR {row.psnr:.2f} dB" if quality == "psnr" else f"SSIM {row.ssim:.4f}"
        choices.append((f"#{i + 1} {row.point.label()} · {speed:.2f}× · {quality_text}{' · Pareto' if row.pareto else ''}", i))
    return {"table": table, "figure": pareto_figure(result, quality), "choices": choices}


def sweep(manager: ModelManager, tab_id: str, values: Mapping[str, Any], thresholds: Any, Ks: Any,
          retentions: Any = "", session: str = "local", on_progress: Progress | None = None,
          axis: str = "measured", quality: str = "psnr", upload_roots: Any = None) -> dict[str, Any]:
    """A bounded thresh x K (x retention) grid on the tab's model for one prompt / seed: an untimed warm-up, the
    baseline, then one cached run per point with the tab's curve; Stop ends it after the current run (that
    interrupted run is dropped)."""
    progress = on_progress or (lambda text, done, total: None)
    tab, variant, req = _request(manager, tab_id, values, upload_roots)
    thresh_values = parse_list(thresholds, float, "thresh values")
    K_values = parse_list(Ks, int, "K values")
    retention_values = parse_list(retentions, float, "retention values") or [req.retention_ratio]
    try:
        points = sweep_grid(thresh_values, K_values, retention_values, MAX_SWEEP_POINTS)
    except ValueError as e:
        raise InvalidRequest(f"Sweep: {_message(e)}") from None
    token = manager.cancel_token(session)
    interrupted: list = []
    try:
        with manager.device_slot(token, on_wait=lambda ahead: progress(f"Waiting for the device ({ahead} ahead)", 0, 1)), \
                _model_for(manager, tab, variant, req, progress) as loaded:
            pipe = loaded.pipe
            call = build_call_kwargs(tab, variant, loaded, req)
            curve = curve_picker(manager, tab_id, values)(loaded, call)

            def on_step_end(p: Any, i: int, t: Any, kwargs: dict) -> dict:
                if token.is_set():
                    p._interrupt = True
                return {}

            call["callback_on_step_end"] = on_step_end
            magcache.remove(pipe)
            runner = PipelineSweep(pipe, call, seed=int(req.seed), preset=loaded.preset, curves=curve.curves,
                                   rules=curve.rules, **curve.options)

            def generate(point):
                out = runner.generate(point)
                if token.is_set():
                    interrupted.append(point)
                return out

            with _eager_unless_compiled(loaded):
                result = run_sweep(generate, points, predict=predictor(curve.curves, curve.rules),
                                   progress=lambda done, total, text: progress(f"Sweep {text}", done, total),
                                   cancel=token, max_points=MAX_SWEEP_POINTS, speedup_axis=axis)
    finally:
        manager.release_token(session, token)
    result.rows = [r for r in result.rows if r.point not in interrupted]
    view = sweep_view(result, axis, quality)
    front = ", ".join(r.point.label() for r in result.front()) or "none"
    matches = [r.matches_prediction for r in result.rows if r.matches_prediction is not None]
    head = (f"⏹ **Sweep stopped** after {len(result.rows)} of {result.total_points} points"
            if result.cancelled else f"✅ **Sweep done**: {len(result.rows)} points")
    status = (f"{head} on {tab.label} ({variant.label}), seed {req.seed}, {call['num_inference_steps']} steps; "
              f"baseline {result.baseline_seconds:.3f} s. Ratio curve: {curve.label}.\n\n"
              f"Pareto front ({axis} speed-up vs {quality.upper()}): {front}."
              + (f" Every run computed exactly the predicted steps: {'yes' if all(matches) else 'no'}." if matches else "")
              + " Click a table row (or pick a point below and press Apply) to set the sliders.")
    return {"status": status, "result": result, "curve": curve, **view}


def apply_point(result: SweepResult | None, index: Any) -> dict[str, Any]:
    """The thresh / retention / K of a sweep row, for the sliders."""
    if result is None or index is None or not 0 <= int(index) < len(result.rows):
        raise InvalidRequest("Run a sweep and choose one of its points first.")
    return result.settings_at(int(index))


# --------------------------------------------------------------------------------------------------
# Export and load
# --------------------------------------------------------------------------------------------------
def snapshot(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> SettingsSnapshot:
    """Everything that decides the tab's schedule now: preset, sliders, steps, branches and the chosen curve."""
    run = _tab_run(manager, tab_id, values)
    curve = current_curve(manager, tab_id, values)
    settings = run.preset.settings(thresh=float(values["thresh"]), retention_ratio=float(values["retention_ratio"]),
                                   K=int(values["K"]), **curve.options)
    return SettingsSnapshot(run.preset.id, settings, run.steps, tuple(tuple(c) for c in curve.curves), curve.rules,
                            run.branches, curve.model, curve.label)


def export_settings(manager: ModelManager, tab_id: str, values: Mapping[str, Any], fmt: str = "json") -> dict[str, Any]:
    """The four export texts and a downloadable settings JSON (written to a fresh folder under the app's output
    directory; the name is generated, never taken from the user)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest(f"Unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    try:
        snap = snapshot(manager, tab_id, values)
        texts = export_all(snap)
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidRequest(f"Export: {_message(e)}") from None
    folder = handlers.output_dir() / "exports" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"magcache-settings-{re.sub(r'[^A-Za-z0-9._-]+', '-', snap.preset)}-{snap.num_steps}steps.json"
    path.write_text(texts["json"], encoding="utf-8")
    return {"text": texts[fmt], "texts": texts, "path": str(path), "language": EXPORT_LANGUAGES[fmt], "snapshot": snap}


def load_settings(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """Restore the sliders, the step count and the curve from a settings JSON (validated first; a bad file
    changes nothing). The file's own curve is used unless it is exactly the tab preset's."""
    try:
        run = _tab_run(manager, tab_id, values)
        raw = _read_upload(path, "settings file")
        snap = load_settings_json(raw)
        _same_family(snap.preset, run.preset, "this settings file")
    except (KeyError, OSError, ValueError) as e:
        raise InvalidRequest(f"Settings not loaded: {_message(e)}") from None
    options = extra_options(snap.settings)
    plain = snap.preset == run.preset.id and not snap.custom_curves and not snap.custom_rules and not options
    s = snap.settings
    notes = []
    if snap.branches != run.branches:
        notes.append(f"the file was made for {snap.branches} transformer pass(es) per step, the tab's guidance gives "
                     f"{run.branches}: set Guidance to match for the same schedule")
    curve_text = "the preset curve" if plain else f"the file's curve ({snap.curve_source or 'preset ' + snap.preset})"
    status = (f"✅ **Loaded** settings for preset `{snap.preset}`: thresh {s.thresh:g}, retention {s.retention_ratio:g}, "
              f"K {s.K}, {snap.num_steps} steps, using {curve_text}."
              + (f" Note: {'; '.join(notes)}." if notes else ""))
    return {"thresh": s.thresh, "retention_ratio": s.retention_ratio, "K": s.K, "steps": snap.num_steps,
            "curve": CURVE_PRESET if plain else CURVE_FILE,
            "curve_file": None if plain else raw.decode("utf-8"), "status": status, "snapshot": snap}


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# --------------------------------------------------------------------------------------------------
# The accordion (Gradio)
# --------------------------------------------------------------------------------------------------
def _default_grid(d: Mapping[str, Any]) -> tuple[str, str]:
    t, K = float(d["thresh"]), int(d["K"])
    thresholds = dict.fromkeys(round(v, 4) for v in (t / 2, t, min(1.0, 2 * t)) if v > 0)
    Ks = dict.fromkeys(k for k in (max(1, K // 2), max(2, K)) if k >= 1)
    if len(Ks) < 2:
        Ks = {2: None, 4: None}
    return ", ".join(f"{v:g}" for v in thresholds), ", ".join(str(k) for k in Ks)


def build_tuning(ctx: Any) -> None:
    """Add the "Tuning" accordion to one tab (``ui/layout.py`` calls this once per tab)."""
    from .zerogpu import gpu_task

    tab, manager, inputs, outputs = ctx.tab, ctx.manager, ctx.inputs, ctx.outputs
    tid = tab.id
    d = handlers.variant_settings(manager, tid, None)
    grid_thresh, grid_K = _default_grid(d)
    default_axis = "predicted" if manager.plan(tid).kind == "tiny" else "measured"
    with gr.Accordion("Tuning: ratio curve, speed-up target, calibration, sweep, export", open=False,
                      elem_id=f"tuning-{tid}"):
        curve = gr.Dropdown(curve_options(manager, tid), value=CURVE_AUTO, label="Ratio curve",
                            info="Which magnitude-ratio curve decides the skips. The preview under the schedule "
                                 "says which one is in use and where it came from.", elem_id=f"curve-{tid}")
        curve_file = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Speed-up target", elem_id=f"tune-target-{tid}"):
                target = gr.Slider(1.1, 5.0, value=2.0, step=0.05, label="Target speed-up (transformer blocks, ×)",
                                   elem_id=f"target-{tid}")
                solve = gr.Button("Solve for thresh and K", size="sm", elem_id=f"solve-{tid}")
                solve_text = gr.Markdown("Sets thresh (smallest that reaches the target) and K (smallest that can) "
                                         "for the current curve, retention and steps.", elem_id=f"solve-text-{tid}")
            with gr.Tab("Calibrate", elem_id=f"tune-calibrate-{tid}"):
                gr.Markdown("One run of the loaded model with **nothing skipped** at this tab's steps, size, "
                            "scheduler and guidance measures the ratio curve (± std over tokens, cosine distance) and "
                            "saves it to your calibration store; later runs pick the best match automatically.")
                with gr.Row():
                    calibrate_btn = gr.Button("Calibrate", variant="primary", elem_id=f"calibrate-{tid}")
                    calibrate_stop = gr.Button("Stop", variant="stop", elem_id=f"calibrate-stop-{tid}")
                calibrate_status = gr.Markdown("", elem_id=f"calibrate-status-{tid}")
                calibrate_plot = gr.Plot(label="Calibration", show_label=False, elem_id=f"calibrate-plot-{tid}")
                upload = gr.File(label="Import a calibration JSON", file_types=[".json"], type="filepath",
                                 elem_id=f"calibration-import-{tid}")
            with gr.Tab("Sweep", elem_id=f"tune-sweep-{tid}"):
                with gr.Row():
                    sweep_thresh = gr.Textbox(grid_thresh, label="thresh values", elem_id=f"sweep-thresh-{tid}")
                    sweep_K = gr.Textbox(grid_K, label="K values", elem_id=f"sweep-K-{tid}")
                    sweep_retention = gr.Textbox("", label="retention values", placeholder="empty: the slider's",
                                                 elem_id=f"sweep-retention-{tid}")
                with gr.Row():
                    axis = gr.Radio(["measured", "predicted"], value=default_axis, label="Speed-up axis",
                                    info="Both are in the table; tiny CPU models time mostly noise.")
                    quality = gr.Radio(["psnr", "ssim"], value="psnr", label="Quality axis")
                gr.Markdown(f"At most {MAX_SWEEP_POINTS} points; one prompt and seed (the tab's), an untimed warm-up "
                            "and the baseline first. Stop ends the sweep after the current run.")
                with gr.Row():
                    sweep_btn = gr.Button("Run sweep", variant="primary", elem_id=f"sweep-{tid}")
                    sweep_stop = gr.Button("Stop", variant="stop", elem_id=f"sweep-stop-{tid}")
                sweep_status = gr.Markdown("", elem_id=f"sweep-status-{tid}")
                sweep_table = gr.Dataframe(label="Sweep (click a row to apply it)", interactive=False,
                                           elem_id=f"sweep-table-{tid}")
                pareto_plot = gr.Plot(label="Pareto", show_label=False, elem_id=f"sweep-plot-{tid}")
                with gr.Row():
                    point = gr.Dropdown([], label="Point", elem_id=f"sweep-point-{tid}")
                    apply_btn = gr.Button("Apply to the sliders", size="sm", elem_id=f"sweep-apply-{tid}")
                sweep_state = gr.State(None)
            with gr.Tab("Export / load", elem_id=f"tune-export-{tid}"):
                fmt = gr.Radio([(label, key) for key, label in EXPORT_FORMATS.items()], value="comfyui",
                               label="Export as", elem_id=f"export-format-{tid}")
                export_btn = gr.Button("Export the current settings", size="sm", elem_id=f"export-{tid}")
                code = gr.Code("", language=None, label="Export", interactive=False, elem_id=f"export-code-{tid}")
                download = gr.File(label="Settings JSON (download)", interactive=False, elem_id=f"export-file-{tid}")
                load = gr.File(label="Load a settings JSON (restores the sliders, steps and curve)",
                               file_types=[".json"], type="filepath", elem_id=f"settings-load-{tid}")
                load_status = gr.Markdown("", elem_id=f"settings-status-{tid}")

    inputs["curve"] = curve
    inputs["curve_file"] = curve_file
    ctx.preview_inputs.extend(LIGHT_INPUTS)
    ctx.preview = lambda v: preview(manager, tid, v)
    ctx.prepare_values.append(lambda v: prepare_values(manager, tid, v))

    light = [n for n in LIGHT_INPUTS if n in inputs]
    light_components = [inputs[n] for n in light]
    everything = set(inputs.values())
    names = {component: name for name, component in inputs.items()}
    schedule_outputs = [outputs["schedule"], outputs["schedule_text"]]
    sliders = [inputs["thresh"], inputs["retention_ratio"], inputs["K"]]

    def light_values(args) -> dict:
        return dict(zip(light, args))

    def all_values(data: dict) -> dict:
        return {names[c]: v for c, v in data.items() if c in names}

    def session(request: Any) -> str:
        return f"{getattr(request, 'session_hash', None) or 'local'}:{tid}:tuning"

    def fail(e: BaseException | str, title: str):
        return gr.Error(handlers.error_html(e), duration=None, title=title)

    def choices_update(values: dict, value: str, with_file: bool | None = None):
        with_file = bool(values.get("curve_file")) if with_file is None else with_file
        return gr.update(choices=curve_options(manager, tid, values.get("variant") or None, with_file), value=value)

    # ---- speed-up target -------------------------------------------------------------------------
    def on_solve(target_value, *args):
        try:
            out = solve_target(manager, tid, light_values(args), target_value)
        except InvalidRequest as e:
            raise fail(e, "Cannot solve") from None
        return out["thresh"], out["K"], out["text"]

    solve.click(on_solve, inputs=[target, *light_components], outputs=[inputs["thresh"], inputs["K"], solve_text],
                queue=False)

    # ---- calibration -----------------------------------------------------------------------------
    def upload_roots() -> list[str]:
        from gradio import utils as gradio_utils

        return [str(gradio_utils.get_upload_folder())]  # files named in a request must be Gradio uploads

    @gpu_task
    def calibrate_on_device(values, key, report):
        return calibrate(manager, tid, values, key, report, upload_roots())

    def on_calibrate(data: dict, request: gr.Request, progress=gr.Progress()):
        values = all_values(data)
        try:
            out = calibrate_on_device(values, session(request),
                                      lambda text, done, total: progress((done, total) if total > 1 else 0.0, desc=text))
        except (InvalidRequest, WeightsNotFound) as e:
            raise fail(e, "Cannot calibrate") from None
        except Exception as e:  # noqa: BLE001 - out of memory or a model error: reported, the app keeps serving
            raise fail(f"The calibration run failed ({type(e).__name__}: {e}).", "Calibration failed") from None
        if out["calibration"] is None:
            return out["status"], gr.update(), gr.update(), gr.update(), gr.update()
        figure, text = preview(manager, tid, values)
        return out["status"], out["figure"], choices_update(values, values.get("curve") or CURVE_AUTO), figure, text

    calibrate_event = calibrate_btn.click(
        on_calibrate, inputs=everything, outputs=[calibrate_status, calibrate_plot, curve, *schedule_outputs],
        show_progress_on=[calibrate_status], concurrency_id="device", concurrency_limit=1)

    def on_stop(request: gr.Request):
        return "⏹ Stopping…" if manager.cancel(session(request)) else "Nothing is running."

    calibrate_stop.click(on_stop, outputs=calibrate_status, cancels=[calibrate_event], queue=False)

    def on_import(path, *args):
        values = light_values(args)
        if path is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            out = import_calibration(manager, tid, values, path)
        except InvalidRequest as e:
            raise fail(e, "Bad calibration file") from None
        values["curve"] = out["curve"]
        figure, text = preview(manager, tid, values)
        return out["status"], choices_update(values, out["curve"]), figure, text

    upload.upload(on_import, inputs=[upload, *light_components],
                  outputs=[calibrate_status, curve, *schedule_outputs])

    # ---- sweep -----------------------------------------------------------------------------------
    @gpu_task
    def sweep_on_device(values, grid, key, report, view):
        return sweep(manager, tid, values, *grid, session=key, on_progress=report, axis=view[0], quality=view[1],
                     upload_roots=upload_roots())

    def on_sweep(data: dict, request: gr.Request, progress=gr.Progress()):
        values = all_values(data)
        grid = (data[sweep_thresh], data[sweep_K], data[sweep_retention])
        try:
            out = sweep_on_device(values, grid, session(request),
                                  lambda text, done, total: progress((done, total) if total > 1 else 0.0, desc=text),
                                  (data[axis], data[quality]))
        except (InvalidRequest, WeightsNotFound) as e:
            raise fail(e, "Cannot sweep") from None
        except Exception as e:  # noqa: BLE001
            raise fail(f"The sweep failed ({type(e).__name__}: {e}).", "Sweep failed") from None
        return (out["status"], out["table"], out["figure"], gr.update(choices=out["choices"], value=None),
                out["result"])

    sweep_event = sweep_btn.click(
        on_sweep, inputs=everything | {sweep_thresh, sweep_K, sweep_retention, axis, quality},
        outputs=[sweep_status, sweep_table, pareto_plot, point, sweep_state],
        show_progress_on=[sweep_status], concurrency_id="device", concurrency_limit=1)
    sweep_stop.click(on_stop, outputs=sweep_status, cancels=[sweep_event], queue=False)

    def on_view(result, axis_value, quality_value):
        if result is None:
            return gr.update(), gr.update(), gr.update()
        view = sweep_view(result, axis_value, quality_value)
        return view["table"], view["figure"], gr.update(choices=view["choices"], value=None)

    for control in (axis, quality):
        control.change(on_view, inputs=[sweep_state, axis, quality], outputs=[sweep_table, pareto_plot, point],
                       queue=False)

    def on_apply(result, index):
        try:
            s = apply_point(result, index)
        except InvalidRequest as e:
            raise fail(e, "Nothing to apply") from None
        return s["thresh"], s["retention_ratio"], s["K"]

    apply_btn.click(on_apply, inputs=[sweep_state, point], outputs=sliders, queue=False)

    def on_row(result, evt: gr.SelectData):
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        s = apply_point(result, index)
        return s["thresh"], s["retention_ratio"], s["K"], index

    sweep_table.select(on_row, inputs=sweep_state, outputs=[*sliders, point], queue=False)

    # ---- export / load ---------------------------------------------------------------------------
    def on_export(fmt_value, *args):
        try:
            out = export_settings(manager, tid, light_values(args), fmt_value)
        except InvalidRequest as e:
            raise fail(e, "Cannot export") from None
        return gr.update(value=out["text"], language=out["language"]), out["path"]

    export_inputs = [fmt, *light_components]
    export_btn.click(on_export, inputs=export_inputs, outputs=[code, download], queue=False)
    fmt.change(on_export, inputs=export_inputs, outputs=[code, download], queue=False)

    restore = [inputs["thresh"], inputs["retention_ratio"], inputs["K"], inputs["steps"], curve, curve_file]

    def on_load(path, *args):
        if path is None:
            return [gr.update()] * (len(restore) + 1)
        values = light_values(args)
        try:
            out = load_settings(manager, tid, values, path)
        except InvalidRequest as e:
            raise fail(e, "Bad settings file") from None
        return (out["thresh"], out["retention_ratio"], out["K"], out["steps"],
                choices_update(values, out["curve"], with_file=out["curve_file"] is not None), out["curve_file"],
                out["status"])

    load.upload(on_load, inputs=[load, *light_components], outputs=[*restore, load_status])

    # ---- the curve list follows the variant and the store ----------------------------------------
    def on_refresh(variant=None, current=CURVE_AUTO, file_text=None):
        options = curve_options(manager, tid, variant or None, bool(file_text))
        value = current if current in {v for _, v in options} else CURVE_AUTO
        return gr.update(choices=options, value=value)

    if "variant" in inputs:
        inputs["variant"].change(on_refresh, inputs=[inputs["variant"], curve, curve_file], outputs=curve, queue=False)
    # once per page load (no inputs, so no other trigger): calibrations saved since the app started are listed
    gr.on(None, lambda: on_refresh(), inputs=None, outputs=curve, queue=False, show_progress="hidden")
