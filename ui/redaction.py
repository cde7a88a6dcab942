"""Gradio's error responses redacted: the UI's layer of the token redaction described in
:mod:`magcache.studio.redaction` (log handlers and streams are redacted there, without Gradio)."""

from __future__ import annotations

from typing import Any

from magcache.studio.manager import redact


def redact_gradio_errors() -> None:
    """Wrap Gradio's ``error_payload`` (the queue and the HTTP routes build every error response with it) so the
    message a client gets is redacted. Gradio 6.31 is pinned; the queue imports the function by name, so both
    references are replaced."""
    from gradio import queueing, utils

    original = utils.error_payload
    if getattr(original, "redacts", False):
        return

    def error_payload(error: BaseException | None, show_error: bool) -> dict[str, Any]:
        content = original(error, show_error)
        for key in ("error", "title"):
            if isinstance(content.get(key), str):
                content[key] = redact(content[key])
        return content

    error_payload.redacts = True  # type: ignore[attr-defined]
    utils.error_payload = error_payload
    queueing.error_payload = error_payload
