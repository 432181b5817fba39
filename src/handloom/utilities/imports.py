"""``lightning.fabric.utilities.imports``: Lightning's private version and platform flags.

Lightning defines no public names here; these flags are offered because programs import them.
None imports the package it describes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

import torch


def _version_at_least(package: str, minimum: str) -> bool:
    """``package``'s installed version is ``minimum`` or later (False when it is not installed)."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return torch.torch_version.TorchVersion(installed) >= minimum


_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])

_NUMPY_AVAILABLE = importlib.util.find_spec("numpy") is not None
_IS_WINDOWS = platform.system() == "Windows"
# An interactive interpreter (sys.ps1) or `python -i`.
_IS_INTERACTIVE = hasattr(sys, "ps1") or bool(sys.flags.interactive)

_TORCH_GREATER_EQUAL_2_2 = _TORCH_VERSION >= "2.2.0"
_TORCH_GREATER_EQUAL_2_3 = _TORCH_VERSION >= "2.3.0"
_TORCH_EQUAL_2_4_0 = _TORCH_VERSION == "2.4.0"
_TORCH_GREATER_EQUAL_2_4 = _TORCH_VERSION >= "2.4.0"
_TORCH_GREATER_EQUAL_2_4_1 = _TORCH_VERSION >= "2.4.1"
_TORCH_GREATER_EQUAL_2_5 = _TORCH_VERSION >= "2.5.0"
_TORCH_GREATER_EQUAL_2_6 = _TORCH_VERSION >= "2.6.0"
_TORCH_LESS_EQUAL_2_6 = _TORCH_VERSION <= "2.6.0"
_TORCHMETRICS_GREATER_EQUAL_1_0_0 = _version_at_least("torchmetrics", "1.0.0")
_PYTHON_GREATER_EQUAL_3_10_0 = sys.version_info >= (3, 10)
