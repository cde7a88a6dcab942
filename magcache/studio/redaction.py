"""Access tokens out of every log line and every error a client sees, whoever produced it.

Three layers, installed by ``app.py`` at start-up:

* a :class:`RedactTokens` filter on the handlers of the root logger and of Gradio's and uvicorn's loggers (their
  handlers are created while the server starts, so ``app.py`` calls :func:`filter_log_handlers` again after
  ``launch``);
* ``sys.stdout`` / ``sys.stderr`` replaced by :class:`RedactingStream`: what bypasses logging (Gradio's
  ``traceback.print_exc()`` of a failed input, ``print``, warnings, handlers bound to the streams later) is
  redacted as it is written;
* Gradio's error payload (the text a client receives for an exception that is not a ``gr.Error``, e.g. an input
  that fails Gradio's own processing, ``could not convert string to float: '<what was typed>'``) redacted: that
  layer patches Gradio, so it lives in the UI (``ui.redaction``).

``manager.redact`` says what a token is: the values of ``HF_TOKEN`` and friends, and anything shaped ``hf_…``.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any, TextIO

from .manager import redact

# Loggers whose handlers (made by uvicorn's dictConfig, or by Gradio) may not propagate to the root logger.
SERVER_LOGGERS = ("", "gradio", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "huggingface_hub")


class RedactTokens(logging.Filter):
    """Every log record (message, arguments and traceback) without access tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written and passes it on. A token is redacted when one ``write`` holds
    it whole, as every line of a traceback or a log record does."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # buffer, errors, reconfigure...: what a library may expect
        return getattr(self.stream, name)


def filter_log_handlers() -> int:
    """Put a :class:`RedactTokens` filter on every handler of :data:`SERVER_LOGGERS` that has none yet; returns
    how many handlers it added one to."""
    added = 0
    for name in SERVER_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactTokens) for f in handler.filters):
                handler.addFilter(RedactTokens())
                added += 1
    return added


def redact_streams() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`RedactingStream` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
