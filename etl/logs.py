"""Logging setup for the command line: text or JSON lines, always through the redaction filter."""

from __future__ import annotations

import logging
import sys

from etl.redact import install_log_redaction

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_etl", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._etl = True  # type: ignore[attr-defined]
    if fmt == "json":
        # imported here: text logs (the default) do not need it, and every command starts here
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter stays at WARNING unless DEBUG was asked for.
    noisy = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in ("apscheduler", "urllib3", "alembic.runtime.plugins", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(noisy)
    install_log_redaction()
