"""Logging set-up shared by the entry points (sidecar, web, CLI).

Library modules only ``from loguru import logger``; each entry point calls
:func:`configure_logging` once.
"""

from __future__ import annotations

import sys

from loguru import logger

from .config import Settings


def configure_logging(settings: Settings, *, component: str) -> None:
    logger.remove()
    logger.configure(extra={"component": component, "request_id": "-"})
    if settings.log_json:
        logger.add(sys.stderr, level=settings.log_level, serialize=True, diagnose=False, backtrace=False)
    else:
        logger.add(
            sys.stderr,
            level=settings.log_level,
            diagnose=False,
            backtrace=False,
            format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[component]}[{process}] "
            "{extra[request_id]} | {message}",
        )
