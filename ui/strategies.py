"""The Strategies view of every tab: MagCache (threshold rule and optimal schedule), uniform and random skipping and
the diffusers cache hooks side by side on the tab's model, quality against speed-up.

Two halves, like the rest of ``ui/``: :func:`strategies_tab` calls the backend
(:func:`magcache.studio.strategies.run_tab_strategies`) and formats what it returns (no Gradio; tests call it on
tiny pipelines), and :func:`build_strategies`, which ``ui/layout.py`` calls once per tab after the tuning panel.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import gradio as gr
import pandas as pd

from magcache.studio import strategies as backend
from magcache.studio.jobs import session_token
from magcache.studio.manager import Cancelled, ModelManager, WeightsNotFound
from magcache.studio.request import InvalidRequest
from magcache.studio.tuning import parse_list

from . import handlers
from .plots import figure_html, strategies_figure

TABLE_HEADERS = ["strategy", "knob", "block work", "speed-up", "wall s", "PSNR", "SSIM"]
Progress = Callable[[str, int, int], None]  # (text, done, total)


def strategies_table(results: backend.StrategyResults) -> pd.DataFrame:
    """One row per measured point: the strategy, its knob, the block work executed (share of the uncached run's),
    the speed-up in block work, the wall time and the quality against the uncached output."""
    rows = [[r.strategy, f"{r.knob} {r.value:g}", f"{r.compute_fraction:.1%}", round(r.compute_speedup, 2),
             round(r.seconds, 3), round(r.psnr, 2), round(r.ssim, 4)] for r in results.rows]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def strategies_tab(manager: ModelManager, tab_id: str, values: Mapping[str, Any], levels: Any = "2, 3, 4",
                   strategies: Any = backend.STRATEGIES, session: str = "local", on_progress: Progress | None = None,
                   upload_roots: Any = None) -> dict[str, Any]:
    """Run the strategies on the tab's model at its inputs: the results, their table and plot and a status line.
    Raises :class:`InvalidRequest` (bad levels, too many runs) before anything queues."""
    req = handlers.request_from_values(tab_id, values, upload_roots)
    parsed = parse_list(levels, float, "speed-up levels", "Strategies")
    report = on_progress or (lambda text, done, total: None)
    with session_token(manager, session) as token:
        try:
            run = backend.run_tab_strategies(manager, req, parsed, list(strategies or ()), token,
                                             lambda phase, done, total: report(handlers.progress_text(phase, done, total),
                                                                               done, total))
        except Cancelled as e:
            return {"status": f"⏹ **Strategies stopped** ({e}).", "results": None, "table": None, "figure": None}
    results, tab = run.results, manager.catalog.tab(tab_id)
    head = (f"⏹ **Strategies stopped** after {len(results.rows)} of {run.planned_runs - 1} points"
            if results.cancelled else f"✅ **Strategies done**: {len(results.rows)} points")
    status = (f"{head} on {tab.label} ({tab.variant(run.request.variant).label}), seed {run.request.seed}, "
              f"{results.num_steps} steps; uncached run {results.baseline_seconds:.3f} s. Ratio curve: "
              f"{run.curve.label}. Speed-up counts the transformer-block work actually executed; PSNR / SSIM are "
              "against the uncached output.")
    if results.unsupported:
        status += "\n\nNot run on this model: " + "; ".join(f"{k} ({v})" for k, v in results.unsupported.items()) + "."
    return {"status": status, "results": results, "table": strategies_table(results),
            "figure": strategies_figure(results, title=f"{tab.label}: seed {run.request.seed}, {results.num_steps} steps")}


def build_strategies(ctx: Any) -> None:
    """Add the "Strategies" accordion to one tab (``ui/layout.py`` calls this once per tab, after the tuning
    panel, so the inputs include its ratio curve)."""
    from .layout import DEVICE_EVENTS  # the concurrency group every device run shares
    from .zerogpu import gpu_task

    tab, manager, inputs = ctx.tab, ctx.manager, ctx.inputs
    tid = tab.id
    with gr.Accordion("Strategies: every cache side by side at equal compute", open=False,
                      elem_id=f"strategies-{tid}"):
        gr.Markdown("On this tab's model, prompt and seed: MagCache's threshold rule and its optimal-budget schedule, "
                    "uniform and random skipping at the same speed-up levels, and each diffusers cache hook that "
                    "runs on the model over its own knob. An uncached run first; at most "
                    f"{backend.MAX_RUNS} runs. Stop ends it after the current run.")
        with gr.Row():
            levels = gr.Textbox("2, 3, 4", label="Speed-up levels (MagCache, uniform, random)",
                                elem_id=f"strategies-levels-{tid}")
            chosen = gr.CheckboxGroup(list(backend.STRATEGIES), value=list(backend.STRATEGIES), label="Strategies",
                                      elem_id=f"strategies-chosen-{tid}")
        with gr.Row():
            run_btn = gr.Button("Compare strategies", variant="primary", elem_id=f"strategies-run-{tid}")
            stop_btn = gr.Button("Stop", variant="stop", elem_id=f"strategies-stop-{tid}")
        stop_note = gr.Markdown("", elem_id=f"strategies-stop-note-{tid}")  # apart from the status: see on_stop
        status = gr.Markdown("", elem_id=f"strategies-status-{tid}")
        # HTML: the wide and the phone layout of the plot (figure_html), the browser shows the one that fits
        plot = gr.HTML(label="Quality vs speed-up", elem_id=f"strategies-plot-{tid}")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="Strategies", interactive=False,
                             elem_id=f"strategies-table-{tid}")

    names = {component: name for name, component in inputs.items()}

    def session(request: Any) -> str:
        return f"{getattr(request, 'session_hash', None) or 'local'}:{tid}:strategies"

    def upload_roots() -> list[str]:
        from gradio import utils as gradio_utils

        return [str(gradio_utils.get_upload_folder())]  # files named in a request must be Gradio uploads

    @gpu_task
    def on_device(values, levels_text, strategies, key, report):
        return strategies_tab(manager, tid, values, levels_text, strategies, key, report, upload_roots())

    def on_run(data: dict, request: gr.Request, progress=gr.Progress()):
        values = {names[c]: v for c, v in data.items() if c in names}
        try:
            out = on_device(values, data[levels], data[chosen], session(request),
                            lambda text, done, total: progress((done, total) if total > 1 else 0.0, desc=text))
        except (InvalidRequest, WeightsNotFound) as e:
            raise gr.Error(handlers.error_html(e), duration=None, title="Cannot compare strategies") from None
        except Exception as e:  # noqa: BLE001 - out of memory or a model error: reported, the app keeps serving
            raise gr.Error(handlers.error_html(f"The strategies run failed ({type(e).__name__}: {e}). The model "
                                               "was reset, so the next run starts clean."),
                           duration=None, title="Strategies failed") from None
        if out["results"] is None:
            return out["status"], gr.update(), gr.update()
        return out["status"], figure_html(out["figure"]), out["table"]

    event = run_btn.click(on_run, inputs=set(inputs.values()) | {levels, chosen}, outputs=[status, plot, table],
                          show_progress_on=[status], concurrency_id="device", concurrency_limit=DEVICE_EVENTS)

    run_btn.click(lambda: "", outputs=stop_note, queue=False, show_progress="hidden")

    def on_stop(request: gr.Request):
        return handlers.stop_requested(manager.cancel(session(request)))

    # The Stop answer has its own line: written into the status it could arrive after the run's own "stopped after
    # ..." and hide it for good.
    stop_btn.click(on_stop, outputs=stop_note, cancels=[event], queue=False)
