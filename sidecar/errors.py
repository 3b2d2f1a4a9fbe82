"""Errors of the sidecar process."""

from __future__ import annotations

from shm_protocol.errors import ShmEmbedError


class SidecarError(ShmEmbedError):
    """Base class of the sidecar's own errors."""


class ModelLoadError(SidecarError):
    """The model could not be loaded (missing folder, bad files, device unavailable)."""


class DeviceError(SidecarError):
    """The configured device does not exist on this machine."""


class TakeoverFailed(SidecarError):
    """A successor could not take the namespace over (nobody serves it, the
    serving sidecar refused or did not let go in time); the serving one, if
    any, goes on serving."""
