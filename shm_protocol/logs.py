"""Logging set-up shared by the entry points (sidecar, web, CLI).

Library modules only ``from loguru import logger``; each entry point calls
:func:`configure_logging` once.
"""

from __future__ import annotations

import sys
import time

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


class RateLimitedLog:
    """Log one line per ``every_s`` at most, saying how many were held back:
    inside the loop, a fault that repeats must not flood the log."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._next = 0.0
        self._held = 0

    def __call__(self, level: str, message: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held = self._held, 0
        suffix = f" ({held} more like it since the last report)" if held else ""
        logger.opt(depth=1).log(level, message + suffix, *args)
        self._next = now + self.every_s
