"""MagCache Studio: run a diffusion model with and without MagCache, side by side.

    python app.py                       # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 7861 --share
    MAGCACHE_TINY=1 python app.py       # every tab on tiny offline pipelines (no downloads, CPU)

Flags fall back to environment variables: MAGCACHE_HOST (default 127.0.0.1; the Docker image sets 0.0.0.0),
MAGCACHE_PORT (7860), MAGCACHE_SHARE, MAGCACHE_TINY; MAGCACHE_MAX_UPLOAD (default 500mb), MAGCACHE_OFFLOAD
(model / sequential: force CPU offload on a GPU), MAGCACHE_GPUS (N > 1: each generation on N GPUs with context
parallelism, see docs/scaling.md). Model weights come from the Hugging Face cache (HF_HOME /
HF_HUB_CACHE) or the MAGCACHE_WEIGHTS_<VARIANT> / MAGCACHE_BASE_<VARIANT> variables; see README.md.
MAGCACHE_PUBLIC (on where SPACE_ID is set): public mode, with a compute budget per request and a limit per client;
housekeeping sweeps the output folder and Gradio's folder on a schedule. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="MagCache Studio")
    parser.add_argument("--host", default=env.get("MAGCACHE_HOST", "127.0.0.1"), help="interface to listen on")
    parser.add_argument("--port", type=int, default=int(env.get("MAGCACHE_PORT", "7860")))
    parser.add_argument("--share", action="store_true", default=_flag(env.get("MAGCACHE_SHARE")),
                        help="create a public gradio.live link")
    parser.add_argument("--tiny", action="store_true", default=_flag(env.get("MAGCACHE_TINY")),
                        help="tiny offline pipelines in every tab (same as MAGCACHE_TINY=1)")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory budget for loaded models (default: MAGCACHE_MEMORY_BUDGET_GB or the device's memory)")
    return parser.parse_args(argv)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


logger = logging.getLogger("magcache.studio.app")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        os.environ["MAGCACHE_TINY"] = "1"
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Gradio's uploads and served copies in a folder of this app's own, so housekeeping sweeps nothing else's.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "magcache-studio-gradio"))
    configure_logging()

    from magcache.studio import public, workers
    from magcache.studio.housekeeping import Janitor, Limits
    from magcache.studio.manager import ModelManager
    from magcache.studio.redaction import filter_log_handlers
    from ui import CSS, JS, THEME, build_app
    from ui.redaction import redact_gradio_errors
    from ui.handlers import output_dir

    options = launch_options(args, output_dir())
    limits = Limits.from_env()
    gpus = workers.gpu_count()  # MAGCACHE_GPUS=N: every generation runs on N GPUs (this process is rank 0)
    manager = workers.start(gpus, budget_gb=args.budget_gb) if gpus > 1 else ModelManager(budget_gb=args.budget_gb)
    app = build_app(manager)
    app.delete_cache = (int(limits.every_s), int(limits.max_age_s))  # Gradio's own sweep of the files it tracks
    # Generate requests are admitted at once (validated; over-budget ones refused) and then wait for the device in
    # ModelManager.device_slot; the calibration, sweep and unload events queue on Gradio's "device" id.
    app.queue(default_concurrency_limit=1, max_size=32)
    redact_gradio_errors()
    limit = public.budget(manager.device)
    logger.info("public mode %s; compute budget %s per request on %s; requests per client: %s",
                "on" if public.public_mode() else "off", f"{limit:,} pixel-steps" if limit else "unlimited",
                manager.device, public.client_queue_limit() or "unlimited")
    janitor = Janitor(housekeeping_folders(output_dir()), limits).start()
    try:
        app.launch(theme=THEME, css=CSS, js=JS, footer_links=["gradio", "settings"], prevent_thread_lock=True,
                   **options)
        filter_log_handlers()  # uvicorn made its handlers during launch
        app.block_thread()
    finally:
        janitor.stop()
        if gpus > 1:
            manager.shutdown()


def configure_logging() -> None:
    """Warnings from libraries, INFO from the app (loads, unloads, stopped runs), tokens redacted everywhere: on
    stdout / stderr themselves and on every log handler (``magcache.studio.redaction``)."""
    from magcache.studio.redaction import filter_log_handlers, redact_streams

    redact_streams()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("magcache").setLevel(os.environ.get("MAGCACHE_LOG_LEVEL", "INFO").upper())
    filter_log_handlers()


def housekeeping_folders(outputs: Path) -> list[Path]:
    """What the schedule sweeps: the output folder, Gradio's upload / cache folder and, in public mode, the
    per-visitor stores."""
    from gradio import utils as gradio_utils

    from magcache.studio import public

    folders = [outputs, Path(gradio_utils.get_upload_folder())]
    if public.public_mode() and not public.shared_calibrations():
        folders.append(public.session_root())
    return folders


def launch_options(args: argparse.Namespace, outputs: Path) -> dict:
    """What the server exposes: the interface from --host (127.0.0.1 unless told otherwise), an upload size
    limit, and no extra served folder (``allowed_paths`` would make a whole folder downloadable). Gradio copies
    each result into its cache and serves the copy; it copies only from the working directory and the temp dir,
    so the output folder must lie in one of them."""
    out = outputs.resolve()
    places = (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())
    if not any(out == p or p in out.parents for p in places):
        raise SystemExit(f"MAGCACHE_OUTPUT_DIR={outputs} lies outside the working directory and the temp dir "
                         f"({', '.join(map(str, places))}): Gradio returns results only from those, and serving the "
                         "folder itself would make every output downloadable. Choose a folder inside one of them "
                         "(or point TMPDIR elsewhere).")
    return dict(server_name=args.host, server_port=args.port, share=args.share, show_error=True, allowed_paths=[],
                max_file_size=os.environ.get("MAGCACHE_MAX_UPLOAD", "500mb"))


if __name__ == "__main__":
    main()
