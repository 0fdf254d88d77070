"""How the daemon's processes log: one format for all of them, plain text (the default) or one
JSON object per line (``server.log_format = "json"``, for journald's and log shippers' parsers),
through ``python-json-logger``. uvicorn's own loggers go through the same handler (its access
log when ``server.access_log`` is on)."""

from __future__ import annotations

import logging

TEXT = "%(asctime)s %(levelname)s {who}%(name)s: %(message)s"


def setup(log_format: str, level: int, who: str = "") -> None:
    """Log to standard error (journald under systemd) in ``log_format`` ("text" or "json");
    ``who`` names the process in every line (a frontend: "frontend 2")."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"process": who or "daemon"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT.format(who=f"{who} " if who else "")))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
