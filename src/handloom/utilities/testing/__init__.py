"""``lightning.fabric.utilities.testing``: :func:`_runif_reasons`, why a test must be skipped here."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

__all__ = ["_runif_reasons"]


def _base_version(version: str) -> torch.torch_version.TorchVersion:
    # "2.13.0.dev20260101+cpu" -> "2.13.0": nightlies count as their release, as in Lightning.
    return torch.torch_version.TorchVersion(version.split("+", 1)[0].split(".dev", 1)[0])


def _runif_reasons(
    *,
    min_cuda_gpus: int = 0,
    min_torch: str | None = None,
    max_torch: str | None = None,
    min_python: str | None = None,
    bf16_cuda: bool = False,
    tpu: bool = False,
    mps: bool | None = None,
    skip_windows: bool = False,
    standalone: bool = False,
    deepspeed: bool = False,
    dynamo: bool = False,
    linux_only: bool = False,
) -> tuple[list[str], dict[str, bool]]:
    """Why a test with these requirements cannot run here (empty when it can), and marker flags.

    Args:
        min_cuda_gpus: At least this many CUDA devices.
        min_torch: At least this torch version.
        max_torch: A torch version below this one.
        min_python: At least this Python version.
        bf16_cuda: A CUDA device with bfloat16.
        tpu: A TPU (never available with handloom).
        mps: ``True``: an Apple MPS device; ``False``: no MPS device.
        skip_windows: Not on Windows.
        standalone: Only with ``PL_RUN_STANDALONE_TESTS=1``.
        deepspeed: DeepSpeed installed.
        dynamo: ``torch.compile`` (dynamo) supported here.
        linux_only: Only on Linux.

    Returns:
        The reasons, and the flags (``min_cuda_gpus``, ``tpu``, ``standalone``) Lightning's test
        configuration reads.
    """
    reasons: list[str] = []
    flags: dict[str, bool] = {}
    torch_version = _base_version(torch.__version__)
    if min_cuda_gpus:
        if torch.cuda.device_count() < min_cuda_gpus:
            reasons.append(f"GPUs>={min_cuda_gpus}")
        flags["min_cuda_gpus"] = True
    if min_torch and torch_version < min_torch:
        reasons.append(f"torch>={min_torch}, {torch.__version__} installed")
    if max_torch and torch_version >= max_torch:
        reasons.append(f"torch<{max_torch}, {torch.__version__} installed")
    if min_python:
        python = torch.torch_version.TorchVersion(".".join(map(str, sys.version_info[:3])))
        if python < min_python:
            reasons.append(f"python>={min_python}")
    if bf16_cuda and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        reasons.append("CUDA device bf16")
    if skip_windows and sys.platform == "win32":
        reasons.append("unimplemented on Windows")
    if tpu:
        reasons.append("TPU")
        flags["tpu"] = True
    if mps is not None:
        available = torch.backends.mps.is_available()
        if mps and not available:
            reasons.append("MPS")
        elif not mps and available:
            reasons.append("not MPS")
    if standalone:
        if os.getenv("PL_RUN_STANDALONE_TESTS", "0") != "1":
            reasons.append("Standalone execution")
        flags["standalone"] = True
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        reasons.append("Deepspeed")
    if dynamo:
        # torch has no public spelling of this check; it is only made when a test asks for it.
        dynamo_module = importlib.import_module("torch._dynamo")
        if not dynamo_module.is_dynamo_supported():
            reasons.append("torch.dynamo")
    if linux_only and sys.platform != "linux":
        reasons.append("only linux")
    return reasons, flags
