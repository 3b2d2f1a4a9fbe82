"""The builder process: ``python -m retrieval.collections.snapshot_builder
build DATA_DIR CID``, started by a worker's :class:`SnapshotManager` (niced,
in the background, never inside a request) to write a new generation of one
collection's snapshot, record this host's mark and compact the change log.
Its exit status: 0 when done (or the collection is gone), ``EXIT_BUSY`` when
another builder of this host holds the collection, 1 on a failure (logged)."""

from __future__ import annotations

import argparse
import os
import sys

from loguru import logger

from shm_protocol.config import Settings
from shm_protocol.errors import ConfigError
from shm_protocol.logs import configure_logging

from .snapshot_files import BuildBusy
from .snapshot_manager import BUILDER_MODULE, EXIT_BUSY, LOCATION_ENV, STALE_HOST_S
from .store import CollectionStore

#: Niceness of a builder process: rebuilds yield the CPU to requests and to the model.
BUILD_NICE = 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=f"python -m {BUILDER_MODULE}",
        description="Build a collection's index snapshot (what workers start). The collection store is the "
                    f"PostgreSQL database of ${LOCATION_ENV} when it is set (never on a command line: it may hold "
                    "a password), else the SQLite store under --sqlite-dir (default: DATA_DIR).")
    sub = ap.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write a new generation of one collection's snapshot")
    build.add_argument("data_dir", help="this host's data directory (its snapshots are under index/)")
    build.add_argument("cid", type=int)
    build.add_argument("--sqlite-dir", help="the SQLite store's directory (default: DATA_DIR)")
    build.add_argument("--ivf-min-vectors", type=int, required=True)
    build.add_argument("--stale-host-s", type=float, default=STALE_HOST_S)
    build.add_argument("--busy-timeout-s", type=float, required=True)
    build.add_argument("--timeout-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    try:
        os.nice(BUILD_NICE)
    except OSError:
        pass
    try:
        configure_logging(Settings.from_env(), component="snapshot-builder")
    except ConfigError:
        configure_logging(Settings(), component="snapshot-builder")
    location = os.environ.get(LOCATION_ENV) or args.sqlite_dir or args.data_dir
    store = None
    try:
        # Two connections at most: the passages are read while the quantizer's training is written.
        store = CollectionStore(location, None, ivf_min_vectors=args.ivf_min_vectors, pool_size=2,
                                busy_timeout_s=args.busy_timeout_s, timeout_s=args.timeout_s,
                                snapshot_dir=args.data_dir, snapshot_stale_host_s=args.stale_host_s)
        store.snapshots.build(args.cid)
        return 0
    except BuildBusy:
        return EXIT_BUSY
    except Exception as exc:
        typed = store.db.storage_error(exc, "building a snapshot") if store is not None else None
        logger.error("collection {}: snapshot build failed: {}", args.cid, typed or exc)  # typed: no password
        return 1
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
