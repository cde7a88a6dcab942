"""The Gradio app: one tab per ``presets.json`` entry, all built by :func:`build_tab` (no per-model tab code).

Components only: every event calls a plain function in :mod:`ui.handlers`. Extensions (the tuning accordion)
plug in through :func:`tab_extensions`: each gets a :class:`TabContext` with the tab's components.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr
from gradio import utils as gradio_utils

from magcache.studio.catalog import Tab
from magcache.studio.comparison import TIMING_BUDGET_S
from magcache.studio.defaults import tab_defaults
from magcache.studio.manager import ModelManager, OutOfMemory, WeightsNotFound, redact
from magcache.studio.public import client_id, generate_slots, public_mode, read_sessions_with
from magcache.studio.request import InvalidRequest

from . import handlers
from .plots import figure_html
from .zerogpu import gpu_task

logger = logging.getLogger("magcache.studio.ui")
TASK_LABELS = {"text-to-image": "Text to image", "image-edit": "Image edit", "text-to-video": "Text to video",
               "image-to-video": "Image to video", "vace": "Video generation with VACE controls",
               "framepack": "Image to video (FramePack sections)"}
TITLE = "# ⚡ MagCache Studio"
INTRO = """MagCache skips denoising steps whose transformer output it can predict: the block stack's residual changes in
magnitude by a ratio that is almost the same for every prompt, so while the accumulated error stays under
**thresh**, the last computed residual is reused. Run a model **with and without** it (same seed, same device) to
see the speed-up, the quality cost and exactly which steps were skipped."""
CSS = """
.mc-status p { margin: 0.2em 0; }
#mc-intro p { max-width: 70em; }
.mc-headline h3 { font-size: 1.5em; margin: 0.1em 0 0.2em; }
.mc-help p { font-size: 0.85em; opacity: 0.8; margin: 0; }
/* a calibration's name is longer than a phone's box: "…" says so, clear of the arrow drawn over the box's end */
.mc-curve .secondary-wrap input { text-overflow: ellipsis; padding-right: 22px; }
.mc-timing-table { width: 100%; border-collapse: collapse; font-size: 0.9em; }
table.mc-timing-table, table.mc-timing-table tr, table.mc-timing-table th, table.mc-timing-table td {
  border: none; border-bottom: 1px solid #e5e7eb; }
.mc-timing-table th, .mc-timing-table td { text-align: left; padding: 4px 8px; }
.mc-timing-table th { font-weight: 600; }
@media (max-width: 700px) {
  .mc-stack-phone { flex-direction: column; }
  .mc-compact-tabs .tab-container button { padding: 0 7px; font-size: 13px; }
  .mc-timing-table thead { display: none; }
  .mc-timing-table tr { display: grid; grid-template-columns: 1fr 1fr; padding: 6px 0; border-bottom: 1px solid #e5e7eb; }
  table.mc-timing-table td { border: none; padding: 1px 4px; }
  .mc-timing-table td:first-child { grid-column: 1 / -1; font-weight: 600; }
  .mc-timing-table td:not(:first-child)::before { content: attr(data-label) ": "; opacity: 0.7; }
}
"""
# On page load: a Generate press scrolls its tab's progress into view when it is off screen (a screen further down
# on a phone); on a phone the intro and the model descriptions start collapsed (they would fill the first screen).
JS = """
() => {
  document.addEventListener('click', (event) => {
    const run = event.target.closest('button[id^="run-"]');
    const status = run && document.getElementById('status-' + run.id.slice(4));
    if (!status) return;
    const r = status.getBoundingClientRect();
    if (r.top < 0 || r.bottom > window.innerHeight) status.scrollIntoView({block: 'start'});
  });
  if (window.innerWidth > 700) return;
  document.querySelectorAll('.mc-collapse-mobile > .label-wrap.open, .mc-collapse-mobile > button.open')
    .forEach((label) => label.click());
}
"""
DEVICE_EVENTS = 8  # device runs admitted at once: one runs, the others wait in the manager's queue and say for what
THEME = gr.themes.Soft(primary_hue="blue", secondary_hue="amber")


@dataclass
class TabContext:
    """What an extension gets: the tab, the manager, and the tab's components by name.

    ``inputs``: variant (only with several variants), prompt, negative_prompt, image, control_video, mask_video,
    reference_images, width, height, num_frames, steps, guidance, seed (those the task has), thresh,
    retention_ratio, K, compare, compile, weights, base. ``outputs``: status, headline, details, schedule (HTML:
    write ``ui.plots.figure_html(figure)`` into it), schedule_text, timing (HTML), metrics, heatmap, and
    baseline_image / magcache_image / slider or baseline_video / magcache_video / split_video.
    Extensions are called in a full-width section below the tab's inputs and results, before the tab's events
    are wired: components an extension adds to ``inputs`` reach Generate's values. An extension may also set
    ``preview(values) -> (figure, text)`` (replaces the live preview, which then also runs on page load and reads
    the inputs named in ``preview_inputs``)."""

    tab: Tab
    manager: ModelManager
    inputs: dict[str, gr.components.Component]
    outputs: dict[str, gr.components.Component]
    preview: Callable[[dict], tuple[Any, str]] | None = None
    preview_inputs: list[str] = field(default_factory=list)


TabExtension = Callable[[TabContext], None]


def tab_extensions() -> list[TabExtension]:
    """``ui/tuning.py``'s ``build_tuning(ctx)`` (one-click calibration, speed-up target, sweeps, export) and then
    ``ui/strategies.py``'s ``build_strategies(ctx)`` (strategies side by side), each when its module exists."""
    builds = []
    for module, function in (("tuning", "build_tuning"), ("strategies", "build_strategies")):
        name = f"{__package__}.{module}"
        build = getattr(importlib.import_module(name), function, None) if importlib.util.find_spec(name) else None
        builds += [build] if build is not None else []
    return builds


def _event_session() -> str | None:
    """The session of the Gradio event running in this thread (Gradio keeps its request in a context variable)."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None)


def build_app(manager: ModelManager | None = None) -> gr.Blocks:
    manager = manager or ModelManager()
    read_sessions_with(_event_session)  # calibrations per visitor in public mode
    with gr.Blocks(title="MagCache Studio") as app:
        gr.Markdown(TITLE)
        with gr.Accordion("What MagCache does", open=True, elem_classes="mc-collapse-mobile", elem_id="mc-about"):
            gr.Markdown(INTRO, elem_id="mc-intro")
        with gr.Tabs():
            for tab in manager.catalog.tabs:
                with gr.Tab(tab.label, id=tab.id, elem_id=f"tab-{tab.id}"):
                    build_tab(tab, manager)
        with gr.Accordion("System: device, memory, loaded models", open=False):
            system = gr.Markdown(handlers.system_markdown(manager))
            with gr.Row():
                refresh = gr.Button("Refresh", size="sm")
                unload = gr.Button("Unload all models", size="sm", variant="secondary")
        refresh.click(lambda: handlers.system_markdown(manager), outputs=system, queue=False)
        unload.click(lambda: handlers.unload_all(manager), outputs=system, concurrency_id="device",
                     concurrency_limit=DEVICE_EVENTS)
    return app


def build_tab(tab: Tab, manager: ModelManager) -> TabContext:
    d = tab_defaults(manager, tab.id, None)
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=380):
            with gr.Accordion(f"{TASK_LABELS[tab.task]}: about this model", open=True,
                              elem_classes="mc-collapse-mobile", elem_id=f"about-{tab.id}"):
                gr.Markdown(tab.description)
            if len(tab.variants) > 1:
                inputs["variant"] = gr.Radio([v.label for v in tab.variants], value=tab.variants[0].label,
                                             label="Model variant")
            _task_inputs(tab, d, inputs)
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id=f"run-{tab.id}")
                stop = gr.Button("Stop", variant="stop", elem_id=f"stop-{tab.id}")
            # the Stop button's answer has its own line: written into the status it could arrive after the run's
            # own "Stopped after step N" (the run stops within a step) and hide it
            stop_note = gr.Markdown(elem_id=f"stop-note-{tab.id}")
            if d.get("examples"):  # below the buttons: Generate stays on a phone's first screen
                gr.Examples([[p] for p in d["examples"]], inputs=[inputs["prompt"]],
                            label="Example prompts: plain English, or the model's own caption grammar")
            with gr.Row():
                inputs["compare"] = gr.Checkbox(True, label="Compare with baseline",
                                                info="Also run without MagCache (same seed) to measure speed-up and quality.")
                inputs["compile"] = gr.Checkbox(False, label="Compile blocks",
                                                info="torch.compile the transformer blocks; the first run compiles "
                                                     "(warm-up, shown separately).")
            inputs["timing_repeats"] = gr.Dropdown(
                [(f"Auto: until steady, at most {TIMING_BUDGET_S:g} s", "auto"), ("1 pair (single runs)", "1"),
                 ("3 pairs", "3"), ("5 pairs", "5"), ("9 pairs", "9")], value="auto", label="Timing repeats",
                info="Baseline and MagCache run in turn, the median speed-up is reported; the images are from the "
                     "first pair (same seed).", elem_id=f"timing-repeats-{tab.id}")
            with gr.Group():
                inputs["thresh"] = gr.Slider(0, 1, value=d["thresh"], step=0.0001, label="thresh (error budget)",
                                             info="Lower = better quality, fewer skipped steps; higher = faster.")
                inputs["retention_ratio"] = gr.Slider(0, 1, value=d["retention_ratio"], step=0.01, label="retention ratio",
                                                      info="Share of the first steps always computed. Higher = better "
                                                           "quality, fewer skips.")
                inputs["K"] = gr.Slider(0, 10, value=d["K"], step=1, label="K (max consecutive skips)",
                                        info="Lower = better quality, fewer skips. 0 turns MagCache off.")
                reset = gr.Button("Reset MagCache to the preset defaults", size="sm", elem_id=f"reset-{tab.id}")
            _generation_settings(tab, d, inputs)
            _model_source(tab, inputs)
        with gr.Column(scale=3, min_width=320):
            outputs["status"] = gr.Markdown("Set the inputs and press **Generate**.", elem_classes="mc-status",
                                            elem_id=f"status-{tab.id}")
            outputs["headline"] = gr.Markdown("", elem_classes="mc-headline", elem_id=f"headline-{tab.id}")
            _result_outputs(tab, outputs)
            gr.Markdown("**Timing** (wall clock of the pipeline call; median ± spread over the timed pairs)")
            outputs["timing"] = gr.HTML("", elem_id=f"timing-{tab.id}")
            gr.Markdown(handlers.PASSES_HELP, elem_classes="mc-help", elem_id=f"passes-help-{tab.id}")
            with gr.Row(elem_classes="mc-stack-phone"):
                outputs["metrics"] = gr.Markdown("", elem_id=f"metrics-{tab.id}")
                outputs["heatmap"] = gr.Image(label="Difference map", type="pil", height=220,
                                              format="png", interactive=False, buttons=[], visible=False,
                                              elem_id=f"heatmap-{tab.id}")
            with gr.Accordion("Details: model, preset, ratio curve", open=False, elem_id=f"details-{tab.id}"):
                outputs["details"] = gr.Markdown("Shown after a run.")
            figure, text = handlers.live_preview(manager, tab.id, {
                "steps": d["num_inference_steps"], "thresh": d["thresh"], "retention_ratio": d["retention_ratio"],
                "K": d["K"], "guidance": d.get("guidance_scale"), "num_frames": d.get("num_frames")})
            # HTML, not gr.Plot: figure_html sends the wide and the phone layout, the browser shows the one that fits
            outputs["schedule"] = gr.HTML(figure_html(figure), label="Schedule", elem_id=f"schedule-{tab.id}")
            outputs["schedule_text"] = gr.Markdown(text)

    ctx = TabContext(tab, manager, inputs, outputs)
    for extend in tab_extensions():
        extend(ctx)
    _wire(ctx, run, stop, stop_note, reset)
    return ctx


def _task_inputs(tab: Tab, d: dict, inputs: dict) -> None:
    if "image" in tab.inputs:
        # A path, not a decoded image: the backend checks the file's size before decoding it (media.load_image).
        inputs["image"] = gr.Image(type="filepath", image_mode=None, label="Input image", height=260)
    inputs["prompt"] = gr.Textbox(d.get("prompt", ""), lines=2, label="Prompt")
    if "negative_prompt" in tab.inputs:
        inputs["negative_prompt"] = gr.Textbox(d.get("negative_prompt", ""), lines=1, label="Negative prompt")
    if tab.task == "vace":
        with gr.Accordion("VACE controls (all optional)", open=False):
            inputs["control_video"] = gr.Video(label="Control video (depth, pose, or a video to edit)", sources=["upload"])
            inputs["mask_video"] = gr.Video(label="Mask video (white = generate, black = keep)", sources=["upload"])
            inputs["reference_images"] = gr.File(file_count="multiple", file_types=["image"], label="Reference images")


def _generation_settings(tab: Tab, d: dict, inputs: dict) -> None:
    with gr.Accordion("Generation settings", open=True):
        if "size" in tab.inputs:
            with gr.Row():
                inputs["width"] = gr.Slider(16, 2048, value=d["width"], step=16, label="Width")
                inputs["height"] = gr.Slider(16, 2048, value=d["height"], step=16, label="Height")
        if "frames" in tab.inputs:
            step = 1 if tab.task == "framepack" else 4  # Wan / HunyuanVideo need 4k+1 frames
            inputs["num_frames"] = gr.Slider(1, 257, value=d["num_frames"], step=step, label="Frames")
        with gr.Row():
            inputs["steps"] = gr.Slider(2, 100, value=d["num_inference_steps"], step=1, label="Steps",
                                        info=f"MagCache ratios calibrated for {d['calibrated_steps']} steps.")
            inputs["guidance"] = gr.Slider(0, 20, value=d["guidance_scale"], step=0.1, label="Guidance",
                                           info="Real CFG above 1: a second (uncond) pass per step." if tab.cfg == "real"
                                           else "Distilled guidance: one pass per step.")
        inputs["seed"] = gr.Number(d.get("seed", 0), precision=0, label="Seed")


def _model_source(tab: Tab, inputs: dict) -> None:
    v = tab.variants[0]
    # Public mode: hidden, and the backend refuses the fields (an API client still sees them).
    with gr.Accordion("Model source", open=False, visible=not public_mode()):
        inputs["weights"] = gr.Textbox("", label="Weights", placeholder=v.weights,
                                       info="Hub id, local diffusers folder, or single-file transformer checkpoint "
                                            "(.safetensors). Empty = default (above) or $" + v.env_weights + ".")
        inputs["base"] = gr.Textbox("", label="Base pipeline (for a single-file or transformer-only source)",
                                    placeholder=v.base or v.weights,
                                    info="Local diffusers folder or hub id with the other components. Empty = "
                                         "$" + v.env_base + " or the default.")


def _result_outputs(tab: Tab, outputs: dict) -> None:
    if tab.is_video:
        with gr.Row():
            outputs["baseline_video"] = gr.Video(label="Baseline (no cache)", interactive=False, autoplay=True, loop=True,
                                                 visible=False)
            outputs["magcache_video"] = gr.Video(label="MagCache", interactive=False, autoplay=True, loop=True,
                                                 visible=False)
        outputs["split_video"] = gr.Video(label="Side by side (one file, frames in sync)", interactive=False,
                                          autoplay=True, loop=True, visible=False)
    else:
        with gr.Row():
            # PNG, not Gradio's default lossy WebP: the two outputs are compared pixel by pixel.
            outputs["baseline_image"] = gr.Image(label="Baseline (no cache)", type="pil", interactive=False,
                                                 format="png", visible=False, elem_id=f"baseline-{tab.id}")
            outputs["magcache_image"] = gr.Image(label="MagCache", type="pil", interactive=False, format="png",
                                                 visible=False, elem_id=f"magcache-{tab.id}")
        outputs["slider"] = gr.ImageSlider(label="Slide: baseline ↔ MagCache", type="pil", interactive=False,
                                           max_height=420, format="png", visible=False, elem_id=f"slider-{tab.id}")


def _wire(ctx: TabContext, run: gr.Button, stop: gr.Button, stop_note: gr.Markdown, reset: gr.Button) -> None:
    tab, manager, inputs, outputs = ctx.tab, ctx.manager, ctx.inputs, ctx.outputs
    result_outputs = [c for n, c in outputs.items() if n != "schedule_text"]

    # Inputs by keyword: the API endpoint /generate_<tab> takes the same names (prompt, steps, thresh, ...).
    def on_generate(request: gr.Request, progress=gr.Progress(), **values):
        still_wanted = _event_alive_check()

        def report(phase: str, done: int, total: int) -> None:
            text = handlers.queue_text(manager, done) if phase == "queue" else handlers.progress_text(phase, done, total)
            progress((done, total) if phase in ("baseline", "magcache") else 0.0, desc=text)

        try:
            out = _generate_on_device(manager, tab.id, values, _session(request, tab), report, still_wanted,
                                      client_id(request))
        except (InvalidRequest, WeightsNotFound) as e:
            raise gr.Error(handlers.error_html(e), duration=None, title="Cannot run") from None
        except OutOfMemory as e:
            raise gr.Error(handlers.error_html(e), duration=None, title="Out of memory") from None
        except Exception as e:  # noqa: BLE001 - anything else: logged, reported, and the app keeps serving
            logger.error("generate %s failed:\n%s", tab.id, redact(traceback.format_exc()))
            raise gr.Error(handlers.error_html(f"The run failed ({type(e).__name__}: {e}). The model was reset, so "
                                               "the next run starts clean; if it keeps failing, press Unload all "
                                               "models."), duration=None, title="Run failed") from None
        return {outputs[n]: _shown(n, v) for n, v in out.items() if n in outputs and n != "schedule_text"}

    # Several Generate requests run their handler at once: each is validated (and over-budget or malformed ones
    # refused) at once, then waits for the device in arrival order in ModelManager.device_slot, saying who holds it.
    event = run.click(on_generate, inputs_kwargs=dict(inputs), outputs=result_outputs, api_name=f"generate_{tab.id}",
                      show_progress_on=[outputs["status"]], concurrency_id="generate",
                      concurrency_limit=generate_slots())
    # Then only the media boxes with a value stay shown (no empty boxes with Compare off). A separate step, so the
    # API endpoint keeps returning plain values.
    media = [outputs[n] for n in MEDIA_OUTPUTS if n in outputs]
    event.then(lambda *values: [gr.update(visible=_has_media(v)) for v in values], inputs=media, outputs=media,
               queue=False, show_progress="hidden", preprocess=False, api_visibility="private")
    def on_stop(request: gr.Request):
        return handlers.stop(manager, _session(request, tab))

    # No ``cancels``: the run stops itself at its next step and then says after which step (a cancelled event
    # would only show an error).
    stop.click(on_stop, inputs=None, outputs=stop_note, queue=False, api_name=f"stop_{tab.id}")
    run.click(lambda: "", outputs=stop_note, queue=False, show_progress="hidden", api_visibility="private")
    ranges = _inline_range_checks(tab, inputs)

    preview_names = [n for n in dict.fromkeys(("variant", "steps", "thresh", "retention_ratio", "K", "guidance",
                                               "num_frames", *ctx.preview_inputs)) if n in inputs]

    def on_preview(*values):
        v = dict(zip(preview_names, values))
        if any(handlers.out_of_range(n, v[n], *ranges[n]) for n in ranges if n in v):
            return gr.update(), gr.update()  # the box is being restored; its change redraws the preview
        figure, text = ctx.preview(v) if ctx.preview is not None else handlers.live_preview(manager, tab.id, v)
        return figure_html(figure), text

    preview_inputs = [inputs[n] for n in preview_names]
    # An extension's preview also runs on page load (triggers=None: load + every input's change), so what it
    # reads outside the inputs (saved calibrations) shows before anything is touched.
    # preprocess=False: a slider's own range check would fail the request on a typed out-of-range value
    gr.on(None if ctx.preview is not None else [inputs[n].change for n in preview_names], on_preview,
          inputs=preview_inputs, outputs=[outputs["schedule"], outputs["schedule_text"]], queue=False,
          show_progress="hidden", trigger_mode="always_last", preprocess=False)

    def on_reset(variant=None):
        d = tab_defaults(manager, tab.id, variant)
        return d["thresh"], d["retention_ratio"], d["K"]

    mc = [inputs["thresh"], inputs["retention_ratio"], inputs["K"]]
    reset.click(on_reset, inputs=[inputs["variant"]] if "variant" in inputs else None, outputs=mc, queue=False)

    if "variant" in inputs:
        settable = [n for n in ("width", "height", "num_frames", "steps", "guidance") if n in inputs]
        keys = {"steps": "num_inference_steps", "guidance": "guidance_scale"}

        def on_variant(variant):
            d = tab_defaults(manager, tab.id, variant)
            v = tab.variant(variant)
            return ([d[keys.get(n, n)] for n in settable] + [d["thresh"], d["retention_ratio"], d["K"]]
                    + [gr.update(placeholder=v.weights), gr.update(placeholder=v.base or v.weights)])

        inputs["variant"].change(on_variant, inputs=inputs["variant"],
                                 outputs=[inputs[n] for n in settable] + mc + [inputs["weights"], inputs["base"]],
                                 queue=False)


def _inline_range_checks(tab: Tab, inputs: dict) -> dict[str, tuple[float, float]]:
    """A value typed into a slider's box outside its range is refused next to the control (in its info line,
    with the range) and the box goes back to the last accepted value. Returns each checked slider's range."""
    ranges = {}
    for name, component in inputs.items():
        if not isinstance(component, gr.Slider):
            continue
        ranges[name] = (component.minimum, component.maximum)
        last = gr.State(component.value)
        label = handlers.NUMBER_LABELS.get(name, name)

        def check(value, accepted, label=label, bounds=ranges[name], info=component.info):
            error = handlers.out_of_range(label, value, *bounds)
            if error is not None:
                return gr.update(value=accepted, info=f"⚠️ {error}"), accepted
            if value == accepted:  # the restored value coming back: keep the message
                return gr.update(), accepted
            return gr.update(info=info), value

        component.change(check, inputs=[component, last], outputs=[component, last], preprocess=False, queue=False,
                         show_progress="hidden")
    return ranges


MEDIA_OUTPUTS = ("baseline_image", "magcache_image", "slider", "heatmap", "baseline_video", "magcache_video",
                 "split_video")


def _timing_html(table: Any) -> str:
    return handlers.table_html(table, "mc-timing-table")


def _has_media(payload: Any) -> bool:
    """Whether a media component's raw value holds a file (an image slider's empty value is a pair of Nones)."""
    if isinstance(payload, (list, tuple)):
        return any(_has_media(p) for p in payload)
    if isinstance(payload, dict):
        return any(_has_media(p) for p in payload.values())
    return bool(payload)


def _shown(name: str, value: Any) -> Any:
    """The timing table as HTML (a table on a wide screen, stacked rows on a phone), the schedule figure as HTML
    (its wide and phone layouts, :func:`ui.plots.figure_html`); other values as they are."""
    if name == "timing":
        return _timing_html(value)
    if name == "schedule":
        return figure_html(value)
    return value


@gpu_task
def _generate_on_device(manager, tab_id, values, session, report, still_wanted=None, client=None):
    return handlers.generate(manager, tab_id, values, session, report, still_wanted=still_wanted,
                             upload_roots=[gradio_utils.get_upload_folder()], client=client)


def _event_alive_check() -> Callable[[], bool]:
    """A check for the running event: False once Gradio cancelled it (Stop, or the client's ``job.cancel()``) or
    its client disconnected. Gradio cannot stop a function running in a worker thread, so the backend asks this at
    every step and stops itself. Reads Gradio's queue (private API, pinned version); any surprise reads as alive,
    so at worst only the Stop button stops a run."""
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        queue = blocks._queue if blocks is not None else None
    except Exception:  # noqa: BLE001
        return lambda: True
    if queue is None or event_id is None:
        return lambda: True

    def alive() -> bool:
        try:
            for job in list(queue.active_jobs):
                for event in job or ():
                    if event._id == event_id:
                        return bool(event.alive)
            return False  # no longer an active job: cancelled
        except Exception:  # noqa: BLE001
            return True

    return alive


def _session(request: gr.Request | None, tab: Tab) -> str:
    return f"{getattr(request, 'session_hash', None) or 'local'}:{tab.id}"
