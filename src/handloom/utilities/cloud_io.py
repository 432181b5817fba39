"""``lightning.fabric.utilities.cloud_io``: :func:`get_filesystem` over fsspec (imported on use)."""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = ["get_filesystem"]


def get_filesystem(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The fsspec filesystem that serves ``path`` (local, ``s3://``, ``gs://``, ...).

    Args:
        path: A local path or a URL.
        **kwargs: Options for the filesystem (``fsspec.core.url_to_fs``'s storage options).

    Returns:
        An ``fsspec.AbstractFileSystem``.

    Raises:
        ImportError: fsspec is not installed.
    """
    try:
        fsspec_core = importlib.import_module("fsspec.core")
    except ImportError as err:
        raise ImportError(
            f"get_filesystem({os.fspath(path)!r}) needs fsspec, which is not installed. Install it with"
            " `pip install fsspec` (plus the package for remote storage, e.g. s3fs)."
        ) from err
    filesystem, _ = fsspec_core.url_to_fs(os.fspath(path), **kwargs)
    return filesystem
