"""The tuning panel of every tab: which ratio curve a run uses, a speed-up target, one-click calibration, a
thresh x K sweep and export / load of the settings.

Two halves, like the rest of ``ui/``: plain functions that call the tuning backend
(:mod:`magcache.studio.tuning`) and format what it returns for the page (no Gradio; tests call them on tiny
pipelines), and :func:`build_tuning`, which ``ui/layout.py`` calls once per tab to add the "Tuning" accordion.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Mapping

import gradio as gr  # only build_tuning uses it; the event functions' annotations (gr.Request, ...) need it here
import pandas as pd

from magcache.export import export_all
from magcache.studio import tuning as backend
from magcache.studio.defaults import tab_defaults
from magcache.studio.jobs import session_token
from magcache.studio.manager import Cancelled, ModelManager, WeightsNotFound
from magcache.studio.request import InvalidRequest
from magcache.studio.sweep import DEFAULT_MAX_POINTS, OptimalSolution, SweepResult
from magcache.studio.tuning import CURVE_AUTO, CURVE_FILE, CURVE_PRESET, curve_options, message

from . import handlers
from .plots import calibration_figure, figure_html, pareto_figure

EXPORT_FORMATS = {"comfyui": "ComfyUI-MagCache node values", "python": "magcache Python snippet",
                  "diffusers": "diffusers MagCacheConfig snippet (with caveats)", "json": "Settings JSON (with the curve)"}
EXPORT_LANGUAGES = {"comfyui": None, "python": "python", "diffusers": "python", "json": "json"}
# Inputs the preview, the solver and the export read (cheap values: no uploads).
LIGHT_INPUTS = ("variant", "steps", "thresh", "retention_ratio", "K", "guidance", "num_frames", "width", "height",
                "weights", "base", "curve", "curve_file")
Progress = Callable[[str, int, int], None]  # (text, done, total)


# --------------------------------------------------------------------------------------------------
# Speed-up target
# --------------------------------------------------------------------------------------------------
def solve_target(manager: ModelManager, tab_id: str, values: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """Thresh and K that reach ``target`` with the current curve, and the sentence that says so."""
    solution, curve = backend.solve_target(manager, tab_id, values, target)
    mark = "✅" if solution.reached else "⚠️"
    return {"thresh": solution.settings.thresh, "K": solution.settings.K, "solution": solution,
            "text": f"{mark} {solution.explanation} Ratio curve: {curve.label}.{optimal_text(solution.optimal)}"}


def optimal_text(o: OptimalSolution | None) -> str:
    """The optimal-budget schedule for the same target, and the modelled error of both schedules."""
    if o is None:
        return ""
    if o.schedule is None:
        return f"\n\nOptimal-budget schedule ({o.budget} computed steps per branch): not possible here, {o.problem}."
    steps = "; ".join(f"{b} {', '.join(map(str, v))}" for b, v in o.schedule.computed.items())
    return (f"\n\nOptimal-budget schedule (`schedule=\"optimal\"`, {o.budget} computed steps per branch, "
            f"{o.schedule.predicted_speedup():.2f}×): computes steps {steps}. Modelled error ({o.error_model} model, "
            f"lower is better): **{o.modelled_error:.3g}** optimal vs **{o.threshold_error:.3g}** threshold rule. "
            "A model, not a measurement: *Strategies* measures both at equal compute.")


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------
def _job_progress(on_progress: Progress | None) -> Callable[[str, int, int], None]:
    report = on_progress or (lambda text, done, total: None)
    return lambda phase, done, total: report(handlers.progress_text(phase, done, total), done, total)


def calibrate_tab(manager: ModelManager, tab_id: str, values: Mapping[str, Any], session: str = "local",
                  on_progress: Progress | None = None, upload_roots: Any = None) -> dict[str, Any]:
    """Calibrate the tab's model at its inputs (:func:`magcache.studio.tuning.run_calibration`): the saved
    calibration, its plot and a status line."""
    req = handlers.request_from_values(tab_id, values, upload_roots)
    with session_token(manager, session) as token:
        try:
            run = backend.run_calibration(manager, req, token, _job_progress(on_progress))
        except Cancelled as e:
            return {"status": f"⏹ **Calibration stopped** ({e}). Nothing was saved.", "calibration": None,
                    "figure": None}
    cal = run.calibration
    curves = ", ".join(f"{b}: ratio {min(c['mag_ratios'][1:]):.3f}–{max(c['mag_ratios'][1:]):.3f}"
                       for b, c in cal.branches.items())
    status = (f"✅ **Calibrated** `{cal.model}` at {cal.num_steps} steps, {cal.resolution.label()}, {cal.scheduler}, "
              f"{'CFG' if cal.cfg else 'no CFG'} ({curves}). Saved as `{cal.id}` in `{run.store_root}`.\n\n"
              "With *Ratio curve: Auto*, runs with these settings now use it (exact match); other step counts or "
              "sizes use the nearest calibration, resampled. The plot shows it over the preset's reference curve.")
    return {"status": status, "calibration": cal, "figure": calibration_figure(cal, run.preset)}


def import_calibration(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """Import an uploaded calibration JSON: the curve choice that uses it and a status line."""
    imported = backend.import_calibration(manager, tab_id, values, path)
    saved = imported.calibration
    if imported.curve == CURVE_AUTO:
        note = "It is this tab's model, so *Auto* uses it whenever it is the best match."
    else:
        note = (f"It was measured on `{saved.model}`, this tab runs `{imported.tab_model}`: it is now selected by "
                "hand in *Ratio curve* (choose *Auto* to go back).")
    return {"status": f"✅ **Imported** `{saved.id}` ({saved.label()}). {note}", "curve": imported.curve,
            "calibration": saved}


# --------------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------------
def sweep_view(result: SweepResult, axis: str = "measured", quality: str = "psnr") -> dict[str, Any]:
    """Table, Pareto plot and point choices of a sweep result."""
    backend.mark_pareto(result, axis, quality)
    headers, rows = result.table()
    table = pd.DataFrame(rows, columns=headers)
    table.insert(0, "#", list(range(1, len(rows) + 1)))
    choices = []
    for i, row in enumerate(result.rows):
        quality_text = f"PSNR {row.psnr:.2f} dB" if quality == "psnr" else f"SSIM {row.ssim:.4f}"
        choices.append((f"#{i + 1} {row.point.label()} · {row.speedup(axis):.2f}× · {quality_text}"
                        f"{' · Pareto' if row.pareto else ''}", i))
    return {"table": table, "figure": pareto_figure(result, quality), "choices": choices}


def sweep_tab(manager: ModelManager, tab_id: str, values: Mapping[str, Any], thresholds: Any, Ks: Any,
              retentions: Any = "", session: str = "local", on_progress: Progress | None = None,
              axis: str = "measured", quality: str = "psnr", upload_roots: Any = None) -> dict[str, Any]:
    """Sweep the grid typed into the panel (:func:`magcache.studio.tuning.run_tab_sweep`): the result, its
    table / plot / point choices and a status line."""
    req = handlers.request_from_values(tab_id, values, upload_roots)
    grid = (backend.parse_list(thresholds, float, "thresh values"), backend.parse_list(Ks, int, "K values"),
            backend.parse_list(retentions, float, "retention values"))
    with session_token(manager, session) as token:
        run = backend.run_tab_sweep(manager, req, *grid, stop=token, on_progress=_job_progress(on_progress),
                                    axis=axis)
    result, tab = run.result, manager.catalog.tab(tab_id)
    view = sweep_view(result, axis, quality)
    front = ", ".join(r.point.label() for r in result.front()) or "none"
    matches = [r.matches_prediction for r in result.rows if r.matches_prediction is not None]
    head = (f"⏹ **Sweep stopped** after {len(result.rows)} of {result.total_points} points"
            if result.cancelled else f"✅ **Sweep done**: {len(result.rows)} points")
    status = (f"{head} on {tab.label} ({tab.variant(run.request.variant).label}), seed {run.request.seed}, "
              f"{run.num_steps} steps; baseline {result.baseline_seconds:.3f} s. Ratio curve: {run.curve.label}.\n\n"
              f"Pareto front ({axis} speed-up vs {quality.upper()}): {front}."
              + (f" Every run computed exactly the predicted steps: {'yes' if all(matches) else 'no'}." if matches else "")
              + " Click a table row (or pick a point below and press Apply) to set the sliders.")
    return {"status": status, "result": result, "curve": run.curve, **view}


def apply_point(result: SweepResult | None, index: Any) -> dict[str, Any]:
    """The thresh / retention / K of a sweep row, for the sliders."""
    if result is None or index is None or not 0 <= int(index) < len(result.rows):
        raise InvalidRequest("Run a sweep and choose one of its points first.")
    return result.settings_at(int(index))


# --------------------------------------------------------------------------------------------------
# Export and load
# --------------------------------------------------------------------------------------------------
def export_settings(manager: ModelManager, tab_id: str, values: Mapping[str, Any], fmt: str = "json") -> dict[str, Any]:
    """The four export texts and a downloadable settings JSON (written to a fresh folder under the app's output
    directory; the name is generated, never taken from the user)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest(f"Unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    try:
        snap = backend.snapshot(manager, tab_id, values)
        texts = export_all(snap)
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidRequest(f"Export: {message(e)}") from None
    folder = handlers.output_dir() / "exports" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"magcache-settings-{re.sub(r'[^A-Za-z0-9._-]+', '-', snap.preset)}-{snap.num_steps}steps.json"
    path.write_text(texts["json"], encoding="utf-8")
    return {"text": texts[fmt], "texts": texts, "path": str(path), "language": EXPORT_LANGUAGES[fmt], "snapshot": snap}


def load_settings(manager: ModelManager, tab_id: str, values: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """Restore the sliders, the step count and the curve from a settings JSON (validated first; a bad file
    changes nothing). The file's own curve is used unless it is exactly the tab preset's."""
    loaded = backend.load_settings(manager, tab_id, values, path)
    snap, s = loaded.snapshot, loaded.snapshot.settings
    notes = []
    if snap.branches != loaded.tab_branches:
        notes.append(f"the file was made for {snap.branches} transformer pass(es) per step, the tab's guidance gives "
                     f"{loaded.tab_branches}: set Guidance to match for the same schedule")
    curve_text = "the preset curve" if loaded.plain else f"the file's curve ({snap.curve_source or 'preset ' + snap.preset})"
    status = (f"✅ **Loaded** settings for preset `{snap.preset}`: thresh {s.thresh:g}, retention {s.retention_ratio:g}, "
              f"K {s.K}, {snap.num_steps} steps, using {curve_text}."
              + (f" Note: {'; '.join(notes)}." if notes else ""))
    return {"thresh": s.thresh, "retention_ratio": s.retention_ratio, "K": s.K, "steps": snap.num_steps,
            "curve": CURVE_PRESET if loaded.plain else CURVE_FILE,
            "curve_file": None if loaded.plain else loaded.text, "status": status, "snapshot": snap}


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
    from .layout import DEVICE_EVENTS
    from .zerogpu import gpu_task

    tab, manager, inputs, outputs = ctx.tab, ctx.manager, ctx.inputs, ctx.outputs
    tid = tab.id
    d = tab_defaults(manager, tid, None)
    grid_thresh, grid_K = _default_grid(d)
    default_axis = "predicted" if manager.plan(tid).kind == "tiny" else "measured"
    with gr.Accordion("Tuning: ratio curve, speed-up target, calibration, sweep, export", open=False,
                      elem_id=f"tuning-{tid}"):
        curve = gr.Dropdown(curve_options(manager, tid), value=CURVE_AUTO, label="Ratio curve",
                            info="Which magnitude-ratio curve decides the skips. Auto: the best-matching calibration "
                                 "in your store, else the preset's published curve. The preview under the schedule "
                                 "says which one is in use and where it came from.",
                            elem_id=f"curve-{tid}", elem_classes="mc-curve")
        curve_file = gr.State(None)
        with gr.Tabs(elem_classes="mc-compact-tabs"):
            # short names: all four fit a phone's tab strip (a longer one sends the rest to an overflow menu)
            with gr.Tab("Target", elem_id=f"tune-target-{tid}"):
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
                calibrate_stop_note = gr.Markdown("", elem_id=f"calibrate-stop-note-{tid}")
                calibrate_status = gr.Markdown("", elem_id=f"calibrate-status-{tid}")
                # HTML: the wide and the phone layout of the plot (figure_html), the browser shows the one that fits
                calibrate_plot = gr.HTML(label="Calibration", elem_id=f"calibrate-plot-{tid}")
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
                gr.Markdown(f"At most {DEFAULT_MAX_POINTS} points; one prompt and seed (the tab's), an untimed warm-up "
                            "and the baseline first. Stop ends the sweep after the current run.")
                with gr.Row():
                    sweep_btn = gr.Button("Run sweep", variant="primary", elem_id=f"sweep-{tid}")
                    sweep_stop = gr.Button("Stop", variant="stop", elem_id=f"sweep-stop-{tid}")
                sweep_stop_note = gr.Markdown("", elem_id=f"sweep-stop-note-{tid}")
                sweep_status = gr.Markdown("", elem_id=f"sweep-status-{tid}")
                sweep_table = gr.Dataframe(label="Sweep (click a row to apply it; # is the label in the plot)",
                                           interactive=False, wrap=False, elem_id=f"sweep-table-{tid}")
                # HTML: the wide and the phone layout of the plot (figure_html), the browser shows the one that fits
                pareto_plot = gr.HTML(label="Pareto", elem_id=f"sweep-plot-{tid}")
                with gr.Row():
                    point = gr.Dropdown([], label="Point", elem_id=f"sweep-point-{tid}")
                    apply_btn = gr.Button("Apply to the sliders", size="sm", elem_id=f"sweep-apply-{tid}")
                sweep_state = gr.State(None)
            with gr.Tab("Export", elem_id=f"tune-export-{tid}"):
                fmt = gr.Radio([(label, key) for key, label in EXPORT_FORMATS.items()], value="comfyui",
                               label="Export as", elem_id=f"export-format-{tid}")
                export_btn = gr.Button("Export the current settings", size="sm", elem_id=f"export-{tid}")
                code = gr.Code("", language=None, label="Export (copy button →)", interactive=False,
                               wrap_lines=True, lines=6, elem_id=f"export-code-{tid}")
                download = gr.File(label="Settings JSON (download)", interactive=False, elem_id=f"export-file-{tid}")
                load = gr.File(label="Load a settings JSON (restores the sliders, steps and curve)",
                               file_types=[".json"], type="filepath", elem_id=f"settings-load-{tid}")
                load_status = gr.Markdown("", elem_id=f"settings-status-{tid}")

    inputs["curve"] = curve
    inputs["curve_file"] = curve_file
    ctx.preview_inputs.extend(LIGHT_INPUTS)
    ctx.preview = lambda v: handlers.live_preview(manager, tid, v)

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
        return calibrate_tab(manager, tid, values, key, report, upload_roots())

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
        figure, text = handlers.live_preview(manager, tid, values)
        return (out["status"], figure_html(out["figure"]), choices_update(values, values.get("curve") or CURVE_AUTO),
                figure_html(figure), text)

    # every action starts from an empty status line (no stale "Calibrated" under a new error) and stop note
    for button, lines in ((calibrate_btn, [calibrate_status, calibrate_stop_note]),
                          (sweep_btn, [sweep_status, sweep_stop_note])):
        button.click(lambda: ("", ""), outputs=lines, queue=False, show_progress="hidden")
    calibrate_btn.click(
        on_calibrate, inputs=everything, outputs=[calibrate_status, calibrate_plot, curve, *schedule_outputs],
        show_progress_on=[calibrate_status], concurrency_id="device", concurrency_limit=DEVICE_EVENTS)

    def on_stop(request: gr.Request):
        return handlers.stop_requested(manager.cancel(session(request)))

    # The Stop answer has its own line: written into the status it could arrive after the run's own "stopped after
    # ..." (the run stops at its next check) and hide it for good.
    calibrate_stop.click(on_stop, outputs=calibrate_stop_note, queue=False)

    def on_import(path, *args):
        values = light_values(args)
        if path is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            out = import_calibration(manager, tid, values, path)
        except InvalidRequest as e:  # in the status line, replacing the last one
            return f"❌ **Bad calibration file**: {handlers.error_html(e)}", gr.update(), gr.update(), gr.update()
        values["curve"] = out["curve"]
        figure, text = handlers.live_preview(manager, tid, values)
        return out["status"], choices_update(values, out["curve"]), figure_html(figure), text

    upload.upload(on_import, inputs=[upload, *light_components],
                  outputs=[calibrate_status, curve, *schedule_outputs])

    # ---- sweep -----------------------------------------------------------------------------------
    @gpu_task
    def sweep_on_device(values, grid, key, report, view):
        return sweep_tab(manager, tid, values, *grid, session=key, on_progress=report, axis=view[0], quality=view[1],
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
        return (out["status"], out["table"], figure_html(out["figure"]),
                gr.update(choices=out["choices"], value=None), out["result"])

    sweep_btn.click(
        on_sweep, inputs=everything | {sweep_thresh, sweep_K, sweep_retention, axis, quality},
        outputs=[sweep_status, sweep_table, pareto_plot, point, sweep_state],
        show_progress_on=[sweep_status], concurrency_id="device", concurrency_limit=DEVICE_EVENTS)
    # no ``cancels``: the sweep ends after its current run and says "stopped after N of M points"
    sweep_stop.click(on_stop, outputs=sweep_stop_note, queue=False)

    def on_view(result, axis_value, quality_value):
        if result is None:
            return gr.update(), gr.update(), gr.update()
        view = sweep_view(result, axis_value, quality_value)
        return view["table"], figure_html(view["figure"]), gr.update(choices=view["choices"], value=None)

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
        except InvalidRequest as e:  # in the status line, replacing the last one
            return [gr.update()] * len(restore) + [f"❌ **Bad settings file**: {handlers.error_html(e)}"]
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
    def on_page_load():
        backend.refresh(manager)  # files changed outside the app (the calibrate command, a trained demo model)
        return on_refresh()

    # once per page load (no inputs, so no other trigger): calibrations saved since the app started are listed
    gr.on(None, on_page_load, inputs=None, outputs=curve, queue=False, show_progress="hidden")
