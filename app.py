"""MagCache Studio: run a diffusion model with and without MagCache, side by side.

    python app.py                       # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 7861 --share
    MAGCACHE_TINY=1 python app.py       # every tab on tiny offline pipelines (no downloads, CPU)

Flags fall back to environment variables: MAGCACHE_HOST (default 127.0.0.1; the Docker image sets 0.0.0.0),
MAGCACHE_PORT (7860), MAGCACHE_SHARE, MAGCACHE_TINY; MAGCACHE_MAX_UPLOAD (default 500mb), MAGCACHE_OFFLOAD
(model / sequential: force CPU offload on a GPU), MAGCACHE_GPUS (N > 1: each generation on N GPUs with context
parallelism, see docs/scaling.md). Model weights come from the Hugging Face cache (HF_HOME /
HF_HUB_CACHE) or the MAGCACHE_WEIGHTS_<VARIANT> / MAGCACHE_BASE_<VARIANT> variables; see README.md.
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tiny:
        os.environ["MAGCACHE_TINY"] = "1"
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    configure_logging()

    from magcache.studio import workers
    from magcache.studio.manager import ModelManager
    from ui import CSS, JS, THEME, build_app
    from ui.handlers import output_dir

    gpus = workers.gpu_count()  # MAGCACHE_GPUS=N: every generation runs on N GPUs (this process is rank 0)
    manager = workers.start(gpus, budget_gb=args.budget_gb) if gpus > 1 else ModelManager(budget_gb=args.budget_gb)
    app = build_app(manager)
    # One generation per device at a time (the Generate buttons share the "device" concurrency id); the
    # schedule previews and the Stop buttons bypass the queue.
    app.queue(default_concurrency_limit=1, max_size=32)
    try:
        app.launch(theme=THEME, css=CSS, js=JS, footer_links=["gradio", "settings"], **launch_options(args, output_dir()))
    finally:
        if gpus > 1:
            manager.shutdown()


class RedactTokens(logging.Filter):
    """Every log line (and traceback) without access tokens, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from magcache.studio.manager import redact

        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def configure_logging() -> None:
    """Warnings from libraries, INFO from the app (loads, unloads, stopped runs), tokens redacted everywhere."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("magcache").setLevel(os.environ.get("MAGCACHE_LOG_LEVEL", "INFO").upper())
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())


def launch_options(args: argparse.Namespace, outputs: Path) -> dict:
    """What the server exposes: the interface from --host (127.0.0.1 unless told otherwise), an upload size
    limit, and no extra served folder unless the output folder lies outside the places Gradio may already copy
    results from (the working directory and the temp dir): ``allowed_paths`` makes a whole folder downloadable."""
    out = outputs.resolve()
    inside = any(out == p or p in out.parents for p in (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()))
    return dict(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                allowed_paths=[] if inside else [str(out)],
                max_file_size=os.environ.get("MAGCACHE_MAX_UPLOAD", "500mb"))


if __name__ == "__main__":
    main()
