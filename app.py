"""MagCache Studio: run a diffusion model with and without MagCache, side by side.

    python app.py                       # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 7861 --share
    MAGCACHE_TINY=1 python app.py       # every tab on tiny offline pipelines (no downloads, CPU)

Flags fall back to environment variables: MAGCACHE_HOST (default 127.0.0.1; the Docker image sets 0.0.0.0),
MAGCACHE_PORT (7860), MAGCACHE_SHARE, MAGCACHE_TINY. Model weights come from the Hugging Face cache (HF_HOME /
HF_HUB_CACHE) or the MAGCACHE_WEIGHTS_<VARIANT> / MAGCACHE_BASE_<VARIANT> variables; see README.md.
"""

from __future__ import annotations

import argparse
import os


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

    from magcache.studio.manager import ModelManager
    from ui import CSS, THEME, build_app
    from ui.handlers import output_dir

    manager = ModelManager(budget_gb=args.budget_gb)
    app = build_app(manager)
    # One generation per device at a time (the Generate buttons share the "device" concurrency id); the
    # schedule previews and the Stop buttons bypass the queue.
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS,
               allowed_paths=[str(output_dir())], show_error=True, footer_links=["gradio", "settings"])


if __name__ == "__main__":
    main()
