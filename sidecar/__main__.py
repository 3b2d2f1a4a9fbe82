"""Entry point: ``shm-embed-sidecar`` or ``python -m sidecar``."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from loguru import logger

from shm_protocol import hotpath
from shm_protocol.config import Settings
from shm_protocol.errors import ShmEmbedError
from shm_protocol.hotpath import HotPathUnavailable
from shm_protocol.logs import configure_logging


def systemd_notifier():
    """A function that sends one message to systemd's NOTIFY_SOCKET, or None
    when not started by systemd (sd_notify(3)'s protocol: one datagram)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(message: str) -> None:
        try:
            sock.sendto(message.encode(), addr)
        except OSError:
            pass

    return notify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shm-embed-sidecar", description=__doc__)
    parser.add_argument("--namespace", help="override SHM_EMBED_NAMESPACE")
    parser.add_argument("--device", help="override SHM_EMBED_DEVICE")
    parser.add_argument("--model", help="override SHM_EMBED_MODEL")
    parser.add_argument("--synthetic-us", type=int, metavar="N",
                        help="serve the synthetic backend (no torch): each model call takes N microseconds "
                             "with the CPU free; overrides SHM_EMBED_SYNTHETIC_US")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings.from_env(os.environ, **overrides)
    except ShmEmbedError as exc:
        print(f"shm-embed-sidecar: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, component="sidecar")
    try:
        hotpath.load()  # first: a sidecar never starts on a half-working transport
    except HotPathUnavailable as exc:
        logger.error("cannot start: {}", exc)
        return 1

    from .server import Sidecar

    notify = systemd_notifier()
    try:
        from .loader import load_models

        sidecar = Sidecar(settings, load_models(settings), notify=notify)
    except ShmEmbedError as exc:
        logger.error("cannot start: {}", exc)
        return 1
    # Handlers only set a flag: no logging or I/O inside a signal handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.request_stop())
    try:
        sidecar.serve()
    except ShmEmbedError as exc:
        logger.error("cannot serve: {}", exc)
        return 1
    if notify:
        notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
