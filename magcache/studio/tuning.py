"""The tuning backend of every tab: which ratio curve a run uses, the live schedule preview, a speed-up target,
one-click calibration, a thresh x K sweep, import of calibrations and export / load of the settings.

The ratio curve is chosen in one place, :func:`pick_curve`, for the preview, the solver, the export and the cached
run of a comparison or a sweep (:func:`curve_for_job`), so the preview and the run cannot disagree. Choices
(``GenerationRequest.curve``): ``auto`` (the best-matching calibration in the user store: exact, else the
nearest, resampled; else the preset curve), ``preset``, ``calibration:<id>`` (one stored calibration, picked by
hand) and ``file`` (the curve of a loaded settings JSON, ``GenerationRequest.curve_file``).

The preview runs on every slider move, so it reads nothing from disk: each tab/variant's model plan and defaults
and the calibration store's records are kept in memory (:func:`refresh` forgets them; the store renews its own
records when a calibration is saved or imported). Runs read the store afresh.

No Gradio here: functions take the tab's input values or a :class:`~.request.GenerationRequest` and return plain
results; ``ui/tuning.py`` arranges and formats them.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from magcache import policy as P
from magcache.calibration import Calibration, CalibrationStore, Match, as_resolution, read_calibration_file
from magcache.curves import (CurveChoice, choose_curves, rules_for_calibration, run_resolution, scheduler_label,
                             source_name)
from magcache.export import SettingsSnapshot, extra_options, load_settings_json
from magcache.jsonfile import MAX_FILE_BYTES
from magcache.measure import calibrate
from magcache.presets import Preset, get_preset

from . import public
from .catalog import Tab
from .defaults import framepack_sections, tab_defaults
from .jobs import DeviceJob, ProgressFn, device_job
from .manager import LoadedModel, LoadPlan, ModelManager, WeightsNotFound
from .request import GenerationRequest, InvalidRequest
from .sweep import (DEFAULT_MAX_POINTS, PipelineSweep, SweepResult, TargetSolution, optimal_for_target, pareto_front,
                    predictor, run_sweep, solve_for_speedup, sweep_grid)

CURVE_AUTO, CURVE_PRESET, CURVE_FILE = "auto", "preset", "file"
CALIBRATION_PREFIX = "calibration:"


# --------------------------------------------------------------------------------------------------
# What the preview keeps in memory
# --------------------------------------------------------------------------------------------------
MAX_KEPT_STORES = 32  # public mode has one store per visitor: only the most recently used stay in memory
_stores: OrderedDict[Path, CalibrationStore] = OrderedDict()
_tab_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> {(tab, variant, weights, base): ...}
_cache_lock = threading.Lock()


def calibration_store(fresh: bool = False) -> CalibrationStore:
    """The calibration store of whoever asks (:func:`.public.calibration_root`: the user store,
    ``$MAGCACHE_HOME/calibrations`` else the user data dir, docs/tuning.md; in public mode the visitor's own), its
    records kept in memory; ``fresh``: read the directory again first (what a run does)."""
    root = public.calibration_root()
    with _cache_lock:
        store = _stores.get(root)
        if store is None:
            store = _stores[root] = CalibrationStore(root, cached=True)
        _stores.move_to_end(root)
        while len(_stores) > MAX_KEPT_STORES:
            _stores.popitem(last=False)
    if fresh:
        store.refresh()
    return store


def refresh(manager: ModelManager) -> None:
    """Forget what the preview keeps (plans, defaults, calibrations): files changed by something else show."""
    with _cache_lock:
        _tab_plans.pop(manager, None)
    calibration_store(fresh=True)


def _plan_and_defaults(manager: ModelManager, tab_id: str, variant: str | None, weights: Any,
                       base: Any) -> tuple[LoadPlan, dict]:
    if public.public_mode():  # the catalog's model only: a visitor's path is never even looked at
        weights = base = None
    key = (tab_id, variant, weights or None, base or None)
    with _cache_lock:
        cached = _tab_plans.setdefault(manager, {}).get(key)
    if cached is None:
        try:
            plan = manager.plan(tab_id, variant, weights, base)
        except (WeightsNotFound, OSError, ValueError):  # a bad path shows when the tab runs; preview the default
            plan = manager.plan(tab_id, variant)
        cached = (plan, tab_defaults(manager, tab_id, variant, plan=plan if (weights or base) else None))
        with _cache_lock:
            _tab_plans.setdefault(manager, {})[key] = cached
    return cached


# --------------------------------------------------------------------------------------------------
# Which ratio curve
# --------------------------------------------------------------------------------------------------
class _NoCalibrations:
    """A store with nothing in it: ``choose_curves`` then returns the preset curve with its usual label."""

    def best_match(self, *args: Any, **kwargs: Any) -> Match:
        return Match(None, None)


def model_key(plan: LoadPlan) -> str:
    """The name calibrations of a plan's model are stored under, before it is loaded: ``tiny:<kind>`` for tiny
    pipelines (as ``python -m magcache calibrate --tiny KIND`` names them), else what
    :func:`magcache.curves.model_id` names the loaded pipeline (the hub id or resolved local path); for a
    transformer loaded on top of a base pipeline, the transformer's."""
    if plan.kind == "tiny":
        return f"tiny:{plan.tiny_kind}"
    source = plan.transformer_source if plan.kind in ("transformer+base", "single_file") else plan.pipeline_source
    return source_name(str(source or plan.variant_id))


def _same_family(preset_id: str, tab_preset: Preset, what: str) -> None:
    other = get_preset(preset_id)
    if other.family and tab_preset.family and other.family != tab_preset.family:
        raise ValueError(f"{what} is for preset {other.id!r} ({other.family} models); this tab runs "
                         f"{tab_preset.id!r} ({tab_preset.family} models)")


def pick_curve(preset_id: str, mode: str | None, model: str, num_steps: int, resolution: Any, scheduler: str | None,
               cfg: bool, settings_file: str | None = None, store: Any = None) -> CurveChoice:
    """The ratio curve for a run of ``model`` (``num_steps``, ``resolution``, ``scheduler``, CFG on/off) under the
    tab's curve choice ``mode``. Raises ``ValueError`` / ``KeyError`` with a message for the user."""
    p = get_preset(preset_id)
    mode = mode or CURVE_AUTO
    store = store if store is not None else calibration_store()
    if mode == CURVE_FILE:
        if not settings_file:
            raise ValueError("no settings file is loaded: load one under Export / load, or choose another curve")
        snapshot = load_settings_json(settings_file)
        _same_family(snapshot.preset, p, "the loaded settings file")
        curves = snapshot.effective_curves
        source = snapshot.curve_source or f"preset {snapshot.preset!r} curve"
        resampled = f", resampled from {len(curves[0])} steps" if len(curves[0]) != num_steps else ""
        return CurveChoice(p.id, curves, snapshot.effective_rules, f"settings file ({source}{resampled})", None,
                           "settings file", extra_options(snapshot.settings))
    if mode.startswith(CALIBRATION_PREFIX):
        cal = store.load(mode[len(CALIBRATION_PREFIX):])
        _same_family(cal.preset, p, f"calibration {cal.id}")
        how = "chosen by hand" + (f", resampled from {cal.num_steps} steps" if cal.num_steps != num_steps else "")
        return CurveChoice(p.id, cal.curves_for(cfg), rules_for_calibration(p.rules),
                           f"calibration {cal.id} ({how}): {cal.label()}", cal, how)
    if mode not in (CURVE_AUTO, CURVE_PRESET):
        raise ValueError(f"unknown ratio curve choice {mode!r}")
    return choose_curves(p, model, num_steps, resolution, scheduler, cfg,
                         store if mode == CURVE_AUTO else _NoCalibrations())


def curve_for_job(job: DeviceJob) -> CurveChoice:
    """The request's ratio curve, chosen from the loaded model and the real call (the store read afresh)."""
    req, call, pipe = job.request, job.call, job.pipe
    resolution = run_resolution(pipe, call) or as_resolution((1024, 1024))
    try:
        return pick_curve(job.loaded.preset, req.curve, model_key(job.plan), int(call["num_inference_steps"]),
                          resolution, scheduler_label(pipe.scheduler),
                          job.tab.num_branches(req.guidance_scale) > 1, req.curve_file,
                          calibration_store(fresh=True))
    except (KeyError, ValueError) as e:
        raise InvalidRequest(f"Ratio curve: {message(e)}") from None


@dataclass
class TabInputs:
    """What a tab's current inputs describe, without running anything."""

    tab: Tab
    variant: str | None
    defaults: dict
    plan: LoadPlan
    preset: Preset
    steps: int
    guidance: float | None
    branches: int
    loaded: LoadedModel | None
    size: dict  # height / width / num_frames as the pipeline gets them


def tab_inputs(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> TabInputs:
    """The tab's input values read into what the preview, the solver and the export need (nothing from disk)."""
    tab = manager.catalog.tab(tab_id)
    variant = values.get("variant") or None
    plan, d = _plan_and_defaults(manager, tab.id, variant, values.get("weights"), values.get("base"))
    steps = values.get("steps")
    steps = int(steps if steps not in (None, "") else d["num_inference_steps"])
    if steps < 2:
        raise ValueError("steps must be at least 2")
    guidance = values.get("guidance")
    guidance = float(guidance) if guidance not in (None, "") else d.get("guidance_scale")
    size: dict[str, Any] = {}
    h, w = values.get("height") or d.get("height"), values.get("width") or d.get("width")
    if h and w and ("size" in tab.inputs or plan.kind == "tiny"):
        size["height"], size["width"] = int(h), int(w)
    if "frames" in tab.inputs:
        size["num_frames"] = int(values.get("num_frames") or d.get("num_frames") or 1)
    loaded = next((m for m in manager.loaded() if m.key == plan.key and m.pipe is not None), None)
    return TabInputs(tab, variant, d, plan, get_preset(plan.preset), steps, guidance, tab.num_branches(guidance),
                     loaded, size)


def current_curve(manager: ModelManager, tab_id: str, values: Mapping[str, Any],
                  inputs: TabInputs | None = None) -> CurveChoice:
    """The curve a run with these inputs would use. When the model is loaded, resolution and scheduler come from
    it exactly as for the run; before that, the scheduler is not known and matches any. A calibrate-first model
    without a calibration has none to preview, solve or export: ``ValueError`` saying to calibrate first."""
    run = inputs or tab_inputs(manager, tab_id, values)
    resolution = run_resolution(run.loaded.pipe, run.size) if run.loaded is not None else None
    scheduler = scheduler_label(run.loaded.pipe.scheduler) if run.loaded is not None else None
    if resolution is None:
        s = run.size
        resolution = as_resolution((s.get("height", 1024), s.get("width", 1024), s.get("num_frames", 1)))
    curve = pick_curve(run.preset.id, values.get("curve"), model_key(run.plan), run.steps, resolution, scheduler,
                       run.branches > 1, values.get("curve_file"))
    if not curve.curves:
        raise ValueError(f"{curve.label}. Calibrate first (Tuning: Calibrate); the calibration is then used automatically")
    return curve


def curve_options(manager: ModelManager, tab_id: str, variant: str | None = None,
                  with_file: bool = False) -> list[tuple[str, str]]:
    """Choices of the "Ratio curve" dropdown: auto, preset, a loaded settings file, and every stored calibration
    of the tab's model family (newest first). Short names first: a phone shows about 33 characters of the chosen
    one (the list itself wraps; the preview text names the curve in use in full)."""
    preset = get_preset(_plan_and_defaults(manager, tab_id, variant, None, None)[1]["preset"])
    out = [("Auto (best match)", CURVE_AUTO), (f"Preset ({preset.id})", CURVE_PRESET)]
    if with_file:
        out.append(("Settings file's curve", CURVE_FILE))
    for cal in calibration_store().list():
        try:
            _same_family(cal.preset, preset, "")
        except ValueError:
            continue
        # what tells one calibration from another first: steps and size, then the model; the time last
        when = cal.created_at[:16].replace("T", " ")
        out.append((f"Calibrated: {cal.num_steps} steps · {cal.resolution.label()} · {'CFG' if cal.cfg else 'no CFG'}"
                    f" · {cal.model} · {cal.scheduler} · {when}", CALIBRATION_PREFIX + cal.id))
    return out


# --------------------------------------------------------------------------------------------------
# Live preview and speed-up target
# --------------------------------------------------------------------------------------------------
@dataclass
class SchedulePreview:
    """The schedule the tab's inputs would run, simulated by the policy (no model)."""

    tab: Tab
    preset: Preset
    settings: P.Settings
    schedule: P.Schedule
    curve: CurveChoice | None  # None: the preset's curve (no curve choice in the inputs)
    sections: int  # FramePack runs the schedule once per section
    expert_switch: int | None  # two-expert models (Wan2.2 A14B): steps the high-noise expert runs


def preview_schedule(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> SchedulePreview:
    """The schedule of the tab's inputs with its chosen curve (``values["curve"]``; absent: the preset's).
    Raises ``ValueError`` / ``KeyError`` / ``TypeError`` naming what is wrong."""
    run = tab_inputs(manager, tab_id, values)
    curve = None
    if values.get("curve") is not None:
        try:
            curve = current_curve(manager, tab_id, values, run)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"Ratio curve: {message(e)}") from None
    settings = run.preset.settings(thresh=float(values["thresh"]), retention_ratio=float(values["retention_ratio"]),
                                   K=int(values["K"]), **(curve.options if curve is not None else {}))
    # the preset's curve for this run length (HunyuanVideo-1.5: its 40-step curve above 20 steps)
    curves, rules = (run.preset.curves_for(run.steps), run.preset.rules) if curve is None else (curve.curves, curve.rules)
    sections = 1
    if run.tab.task == "framepack" and run.size.get("num_frames"):
        sections = framepack_sections(run.size["num_frames"], run.defaults.get("latent_window_size", 9))
    split = P.reference_split_step(rules, run.steps)  # Wan2.2 A14B: the reference sampler's expert switch
    return SchedulePreview(run.tab, run.preset, settings,
                           P.simulate(curves, run.steps, settings, rules, run.branches, split), curve, sections, split)


def solve_target(manager: ModelManager, tab_id: str, values: Mapping[str, Any],
                 target: Any) -> tuple[TargetSolution, CurveChoice]:
    """Thresh and K that reach ``target`` (predicted block speed-up) with the current curve, retention and steps;
    ``solution.optimal``: the budget-optimal schedule for the same target and the modelled error of both."""
    try:
        run = tab_inputs(manager, tab_id, values)
        curve = current_curve(manager, tab_id, values, run)
        settings = run.preset.settings(thresh=float(values["thresh"]), retention_ratio=float(values["retention_ratio"]),
                                       K=int(values["K"]), **curve.options)
        solution = solve_for_speedup(curve.curves, run.steps, float(target), settings, curve.rules, run.branches)
        solution.optimal = optimal_for_target(solution, curve.curves, curve.rules, cos_curves_for(curve, run.preset))
        return solution, curve
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidRequest(f"Speed-up target: {message(e)}") from None


def cos_curves_for(curve: CurveChoice, preset: Preset) -> list[list[float]] | None:
    """The cosine-distance curves measured with ``curve`` (the optimal schedule's error model uses them): a
    calibration's, the preset's with its own curve, none for a settings file's curve."""
    if curve.calibration is not None:
        cal = curve.calibration
        return [list(cal.branches[b]["cos_dis"]) for b in P.BRANCH_NAMES if b in cal.branches][:len(curve.curves)]
    if curve.how is None and preset.cos_curves is not None:
        return [list(c) for c in preset.cos_curves]
    return None


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
@dataclass
class CalibrationRun:
    calibration: Calibration  # saved: it has its id
    store_root: Path
    preset: Preset  # the tab's, whose published curve the calibration is compared with


def run_calibration(manager: ModelManager, req: GenerationRequest, stop: threading.Event | None = None,
                    on_progress: ProgressFn | None = None) -> CalibrationRun:
    """Run the tab's model once with nothing skipped at the request's steps, size and scheduler (through the
    device queue, stoppable) and save the measured curves to the user store. Progress phase: "calibration".
    Raises :class:`~.manager.Cancelled` (nothing saved) when stopped."""
    with device_job(manager, req, stop, on_progress, runs=1) as job:
        job.phase = "running the calibration"
        tab, variant, loaded = job.tab, job.variant, job.loaded
        call = dict(job.call, generator=job.generator(), **job.step_arguments("calibration"))
        job.progress("calibration", 0, job.total_steps)
        source = (f"MagCache Studio, {tab.label} tab ({variant.label}): seed {job.request.seed}, "
                  f"prompt {job.request.prompt[:200]!r}")
        with job.eager_unless_compiled():
            try:
                cal = calibrate(job.pipe, call, loaded.preset, model=model_key(job.plan), source=source)
            except RuntimeError:
                job.raise_if_stopped("calibration run")  # interrupted: the run did not complete, nothing recorded
                raise
        job.call_returned("calibration")
        job.raise_if_stopped("calibration run")
        preset = get_preset(loaded.preset)
    store = calibration_store()
    return CalibrationRun(store.save(cal), store.root, preset)


def read_upload(path: Any, what: str) -> bytes:
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


@dataclass
class ImportedCalibration:
    calibration: Calibration  # as saved in the store, with its new id
    curve: str  # the curve choice that uses it: auto for this tab's model, else the calibration by hand
    tab_model: str  # the name this tab's calibrations are stored under


def import_calibration(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> ImportedCalibration:
    """Validate an uploaded calibration JSON and copy it into the store (nothing is written if it is bad, or if it
    belongs to another model family)."""
    try:
        run = tab_inputs(manager, tab_id, values)
        if path is None:
            raise ValueError("no calibration file was uploaded")
        path = path.get("path") if isinstance(path, Mapping) else path
        cal = read_calibration_file(path)
        _same_family(cal.preset, run.preset, f"this calibration ({cal.model})")
        saved = calibration_store().import_file(path)
    except (KeyError, OSError, ValueError) as e:
        raise InvalidRequest(f"Calibration not imported: {message(e)}") from None
    key = model_key(run.plan)
    return ImportedCalibration(saved, CURVE_AUTO if saved.model == key else CALIBRATION_PREFIX + saved.id, key)


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------
def parse_list(text: Any, cast: type, what: str, panel: str = "Sweep") -> list:
    """``"0.05, 0.1 0.2"`` -> ``[0.05, 0.1, 0.2]``; a clear message (starting with ``panel``) for anything that is
    not a number."""
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
            raise InvalidRequest(f"{panel}: {what} must be {'whole ' if cast is int else ''}numbers separated by "
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


@dataclass
class TabSweep:
    result: SweepResult
    curve: CurveChoice
    request: GenerationRequest  # validated
    num_steps: int


def run_tab_sweep(manager: ModelManager, req: GenerationRequest, thresholds: list[float], Ks: list[int],
                  retentions: list[float], stop: threading.Event | None = None, on_progress: ProgressFn | None = None,
                  axis: str = "measured") -> TabSweep:
    """A bounded thresh x K x retention grid (no retention: the request's) on the tab's model for one prompt /
    seed: an untimed warm-up, the baseline, then one cached run per point with the request's curve; Stop ends it
    after the current run (that interrupted run is dropped). Progress phase: the sweep's own text
    ("Sweep 2/6: t0.1 K2 R0.2")."""
    if not retentions:
        retention = req.retention_ratio
        if retention is None:
            retention = _plan_and_defaults(manager, req.tab_id, req.variant, req.weights, req.base)[1]["retention_ratio"]
        retentions = [retention]
    try:
        points = sweep_grid(thresholds, Ks, retentions, DEFAULT_MAX_POINTS)
    except ValueError as e:
        raise InvalidRequest(f"Sweep: {message(e)}") from None
    interrupted: list = []
    with device_job(manager, req, stop, on_progress, runs=1) as job:  # the budget counts one run at a time
        job.phase = "running the sweep"
        curve = curve_for_job(job)
        if not curve.curves:  # a calibrate-first model: every point would run uncached
            raise InvalidRequest(f"Sweep: {curve.label}. Calibrate first (Tuning: Calibrate)")
        call = dict(job.call, **job.step_arguments(None))
        runner = PipelineSweep(job.pipe, call, seed=int(job.request.seed), preset=job.loaded.preset,
                               curves=curve.curves, rules=curve.rules, **curve.options)

        def generate(point):
            out = runner.generate(point)
            if job.stopped:
                interrupted.append(point)
            return out

        with job.eager_unless_compiled():
            result = run_sweep(generate, points, predict=predictor(curve.curves, curve.rules),
                               progress=lambda done, total, text: job.progress(f"Sweep {text}", done, total),
                               cancel=stop, max_points=DEFAULT_MAX_POINTS, speedup_axis=axis)
    result.rows = [r for r in result.rows if r.point not in interrupted]
    return TabSweep(result, curve, job.request, job.call["num_inference_steps"])


# --------------------------------------------------------------------------------------------------
# Export and load
# --------------------------------------------------------------------------------------------------
def snapshot(manager: ModelManager, tab_id: str, values: Mapping[str, Any]) -> SettingsSnapshot:
    """Everything that decides the tab's schedule now: preset, sliders, steps, branches and the chosen curve."""
    run = tab_inputs(manager, tab_id, values)
    curve = current_curve(manager, tab_id, values, run)
    settings = run.preset.settings(thresh=float(values["thresh"]), retention_ratio=float(values["retention_ratio"]),
                                   K=int(values["K"]), **curve.options)
    return SettingsSnapshot(run.preset.id, settings, run.steps, tuple(tuple(c) for c in curve.curves), curve.rules,
                            run.branches, model_key(run.plan), curve.label)


@dataclass
class LoadedSettings:
    snapshot: SettingsSnapshot
    text: str  # the file's JSON text (the curve choice "file" reads it)
    plain: bool  # exactly the tab preset's curve and rules: restored as the preset choice
    tab_branches: int  # transformer passes per step with the tab's guidance now


def load_settings(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> LoadedSettings:
    """A settings JSON validated for this tab (a bad file changes nothing)."""
    try:
        run = tab_inputs(manager, tab_id, values)
        raw = read_upload(path, "settings file")
        snap = load_settings_json(raw)
        _same_family(snap.preset, run.preset, "this settings file")
    except (KeyError, OSError, ValueError) as e:
        raise InvalidRequest(f"Settings not loaded: {message(e)}") from None
    plain = (snap.preset == run.preset.id and not snap.custom_curves and not snap.custom_rules
             and not extra_options(snap.settings))
    return LoadedSettings(snap, raw.decode("utf-8"), plain, run.branches)


def message(e: BaseException) -> str:
    """An exception's message for the user (a ``KeyError`` without its quotes)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)

