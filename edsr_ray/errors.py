"""Exceptions that carry a message meant for the user.

Every error a user can cause (a bad config key, a corrupt image, a checkpoint of the wrong architecture, an
unreachable endpoint) is raised as a subclass of :class:`EdsrRayError`, so entry points can print the message and exit
non-zero instead of showing a traceback (:mod:`edsr_ray.cli` maps them to the exit status: :class:`Interrupted` to 3,
the others to 2).
"""

from __future__ import annotations


class EdsrRayError(Exception):
    """Base class: the message alone tells the user what is wrong and where."""


class ConfigError(EdsrRayError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, value out of range)."""


class FieldError(ConfigError):
    """One key of a config section is invalid: raised by the section's own checks (:func:`require`), then named with
    its section and file by :func:`edsr_ray.config.from_dict`."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def require(ok: bool, key: str, message: str) -> None:
    """The check of one config key in ``__post_init__``: a :class:`FieldError` for ``key`` unless ``ok``."""
    if not ok:
        raise FieldError(key, message)


class LocationError(ConfigError):
    """A location (path or URI) uses a scheme that the place it was given to does not support (``gs://``, ...)."""


class ImageError(EdsrRayError, ValueError):
    """An image cannot be decoded, is too large, or has a mode that cannot be handled."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit (decompression-bomb guard)."""


class ModelLoadError(EdsrRayError, ValueError):
    """A weights file cannot be loaded: unsafe pickle, not an EDSR/MDSR state dict, wrong architecture."""


class StorageError(EdsrRayError, OSError):
    """Object storage or the local file system failed (unreachable endpoint, missing key, denied access)."""


class EvaluationError(EdsrRayError):
    """An evaluation cannot start: an unknown set, a missing LR partner, a size mismatch, a bad model or option."""


class Interrupted(EdsrRayError):
    """A run stopped part-way through a failure outside its input (a cluster or storage failure): what it wrote is
    complete and kept, and running the same command again finishes the work."""
