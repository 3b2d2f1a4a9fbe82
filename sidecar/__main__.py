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


def detach_successor():
    """Fork: the parent (the launcher, what ExecReload= runs) waits for the
    child's report and returns its exit status as an int; the child returns
    a function that sends the report (once) and goes on to load and serve."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            return 0
        print(f"shm-embed-sidecar: the takeover failed: {message or 'the new sidecar exited'}", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()  # not killed with the launcher's session; still in the service's cgroup

    def report(message: str) -> None:
        nonlocal write_fd
        if write_fd >= 0:
            try:
                os.write(write_fd, message.encode())
            finally:
                os.close(write_fd)
                write_fd = -1

    return report


def _also_reporting(notify, report):
    """``notify`` that also tells the launcher "ok" when the sidecar sends READY=1."""
    def send(message: str) -> None:
        if notify:
            notify(message)
        if "READY=1" in message.split("\n"):
            report("ok")

    return send


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shm-embed-sidecar", description=__doc__)
    parser.add_argument("--namespace", help="override SHM_EMBED_NAMESPACE")
    parser.add_argument("--device", help="override SHM_EMBED_DEVICE")
    parser.add_argument("--model", help="override SHM_EMBED_MODEL")
    parser.add_argument("--synthetic-us", type=int, metavar="N",
                        help="serve the synthetic backend (no torch): each model call takes N microseconds "
                             "with the CPU free; overrides SHM_EMBED_SYNTHETIC_US")
    parser.add_argument("--takeover", action="store_true",
                        help="take the namespace over from the sidecar serving it: load the models while it "
                             "serves, then have it drain and hand over (docs/takeover.md)")
    parser.add_argument("--detach", action="store_true",
                        help="with --takeover: serve from a child process and exit once it serves (0) or "
                             "failed (1, with the reason); for systemd's ExecReload=")
    args = parser.parse_args(argv)
    takeover, detach = args.takeover, args.detach
    if detach and not takeover:
        parser.error("--detach goes with --takeover")
    if detach:
        report = detach_successor()
        if isinstance(report, int):
            return report  # the launcher's exit status
    else:
        report = None
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("takeover", "detach")}
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
    if report:  # the launcher exits once the new sidecar serves; it stays
        notify = _also_reporting(notify, report)
    try:
        from .loader import load_models

        sidecar = Sidecar(settings, load_models(settings), notify=notify)
    except ShmEmbedError as exc:
        logger.error("cannot start: {}", exc)
        if report:
            report(f"cannot start: {exc}")
        return 1
    # Handlers only set a flag: no logging or I/O inside a signal handler.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.request_stop())
    try:
        sidecar.serve(takeover=takeover)
    except ShmEmbedError as exc:
        logger.error("cannot serve: {}", exc)
        if report:
            report(f"cannot serve: {exc}")
        return 1
    # Not after a handover: the successor is the unit's main process now,
    # and with NotifyAccess=all a STOPPING=1 of ours would stop the unit.
    if notify and not sidecar.successor:
        notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
