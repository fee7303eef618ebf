"""Log set-up shared by ``cortex serve`` and ``neuron run``: text or JSON lines, one line per
request, and no secret in any line.

Request lines are logged to the ``cortex.requests`` logger (gateway) and ``neuron.requests``
(neuron) with their fields in ``extra={"fields": {...}}``: the text format appends them as
``key=value``, the JSON format (``--log-format json``) puts them at the top level of the object,
so a log pipeline needs no parsing rules. Our code never logs a prompt, a key or a token; as a
second line of defence both formats mask anything shaped like a credential (bearer tokens,
cortex ``ck-`` keys, OpenAI/Anthropic/HF tokens, ``key=...`` pairs) before a line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")
REQUEST_LOGGER = "cortex.requests"
NEURON_REQUEST_LOGGER = "neuron.requests"
MASK = "[redacted]"

_SECRETS = re.compile(
    r"(?i)(?:bearer\s+\S+"
    r"|\bck-[A-Za-z0-9_\-]{8,}"
    r"|\bsk-[A-Za-z0-9_\-]{8,}"
    r"|\bhf_[A-Za-z0-9]{8,}"
    r"|\b(?:api[_-]?key|x-api-key|authorization|token|password|secret)"
    r"(?:\"|')?\s*[:=]\s*(?:\"|')?(?:bearer\s+)?[^\s\"',}]+)"
)


def redact(text: str) -> str:
    """``text`` with anything shaped like a credential replaced by ``[redacted]``."""
    return _SECRETS.sub(MASK, text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO cortex.requests: /v1/chat/completions model=... node=...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_shown(v)}" for k, v in fields.items() if v is not None)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the record's
    fields, and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():
            if value is not None:
                entry.setdefault(key, redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        # masked before encoding: a mask applied to JSON text could cut through its quoting
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """Route every logger (uvicorn's included) to stderr in ``log_format`` at ``level``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # uvicorn's own handlers would print in their format: send its records to ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def request_logger(name: str = REQUEST_LOGGER) -> logging.Logger:
    return logging.getLogger(name)
