"""Structured logs for the journal: one JSON object per line on stderr, secrets scrubbed.

Scrubbing happens on the finished line, so a secret cannot leak through a message argument, an
exception text, or an `extra` field, whoever logged it.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    # Attributes every LogRecord has; anything else came from `extra=` and is logged as a field.
    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({v for v in (secrets or {}).values() if v and len(v) >= 4},
                               key=len, reverse=True)

    def add_secrets(self, secrets: dict[str, str]) -> None:
        """Scrub these too (a reloaded config's secrets file); old values stay scrubbed."""
        values = set(self._secrets) | {v for v in secrets.values() if v and len(v) >= 4}
        self._secrets = sorted(values, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for value in self._secrets:
            text = text.replace(value, "***")
        return text

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self.scrub(json.dumps(doc, default=str, ensure_ascii=False))


def setup(secrets: dict[str, str] | None = None, level: int = logging.INFO, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request line at INFO: noise in the journal every probe interval.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def add_secrets(secrets: dict[str, str]) -> None:
    """Add values to every JSON handler's scrub list (the daemon calls this on reload)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.add_secrets(secrets)
