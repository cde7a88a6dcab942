"""The JSON files the library reads and writes (calibrations, settings): a size limit, no NaN/Infinity, a
``format`` / ``version`` header and no unknown fields, and one curve per line when written."""

from __future__ import annotations

import json
import re
from typing import Any, Collection

MAX_FILE_BYTES = 512 * 1024  # a 1000-step CFG calibration is ~100 KB


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in this file (numbers must be finite)")


def load_json_text(text: str | bytes, what: str = "calibration file") -> Any:
    """``json.loads`` with a size limit and no NaN/Infinity, turning every failure into a ``ValueError``."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise ValueError(f"{what} is too large ({len(text)} bytes; the limit is {MAX_FILE_BYTES})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: {e}") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ValueError(f"{what} is too large (the limit is {MAX_FILE_BYTES} bytes)")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {e}") from None


def check_header(data: Any, fmt: str, version: int, keys: Collection[str], what: str) -> dict:
    """``data`` is a JSON object of format ``fmt`` and ``version`` with no field outside ``keys``; ``what`` names
    the kind of file in the messages ("calibration file", "MagCache Studio settings file")."""
    if not isinstance(data, dict):
        raise ValueError(f"a {what} must hold a JSON object")
    if data.get("format") != fmt:
        raise ValueError(f"not a {what}: 'format' must be {fmt!r}, got {data.get('format')!r}")
    if data.get("version") != version:
        raise ValueError(f"unsupported {what} version {data.get('version')!r} (this library reads {version})")
    unknown = set(data) - set(keys)
    if unknown:
        raise ValueError(f"unknown fields in {what}: {', '.join(sorted(map(str, unknown)))}")
    return data


def dumps_readable(obj: Any) -> str:
    """Indented JSON with each list of numbers on one line, so a file shows one curve per line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"
