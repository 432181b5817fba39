"""Counting FLOPs (:func:`measure_flops`) and the peak a device can deliver (:func:`get_available_flops`).

The peak table below is built from vendor datasheets, one source per entry. Every figure is the
dense peak: datasheets print tensor-core figures "with sparsity" (2:4 structured sparsity), which
are twice the dense ones, and a dense training run can never reach them. Where a datasheet prints
only the sparse figure, the entry holds half of it. Figures are in TFLOPS (TOPS for int8) at
boost clock; ``get_available_flops`` returns FLOP/s.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["get_available_flops", "measure_flops"]

_log = logging.getLogger(__name__)

PeakKey = Literal["fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8"]


@dataclass(frozen=True, slots=True)
class _Peak:
    """Dense peak throughput of one GPU model, per data type, in TFLOPS (TOPS for int8).

    ``fp32`` is the non-tensor-core peak (what float32 matmuls reach with TF32 disabled); ``tf32``,
    ``bf16``, ``fp16``, ``fp8`` and ``int8`` are tensor-core (matrix-core) peaks; ``fp64`` is the
    FP64 tensor-core peak where the part has one.
    """

    name: str
    pattern: str  # a regular expression matched against the lower-cased device name
    source: str
    tflops: Mapping[PeakKey, float]


def _peak(name: str, pattern: str, source: str, **tflops: float) -> _Peak:
    return _Peak(name, pattern, source, tflops)  # type: ignore[arg-type]  # keys are PeakKey names


_HALVED = " (dense = half the printed 'with sparsity' figure)"

# Order matters: the first pattern that matches the device name wins, so more specific names
# (GH200 before H200, H100 NVL and PCIe before H100, L40S before L40 before L4) come first.
# fmt: off
_PEAKS: tuple[_Peak, ...] = (
    _peak("B200", r"\bb200\b",
          "NVIDIA HGX B200 datasheet, the 8-GPU totals divided by 8" + _HALVED,
          fp64=37, fp32=75, tf32=1125, bf16=2250, fp16=2250, fp8=4500, int8=4500),
    _peak("GH200", r"\bgh200\b",
          "NVIDIA GH200 Grace Hopper Superchip datasheet (dense figures)",
          fp64=67, fp32=67, tf32=494, bf16=990, fp16=990, fp8=1979, int8=1979),
    _peak("H200 NVL", r"\bh200\b.*\bnvl",
          "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column" + _HALVED,
          fp64=60, fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5, int8=1670.5),
    _peak("H200 SXM", r"\bh200\b",
          "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column" + _HALVED,
          fp64=67, fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979, int8=1979),
    _peak("H100 NVL", r"\bh100\b.*\bnvl",
          "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column" + _HALVED,
          fp64=60, fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5, int8=1670.5),
    _peak("H100 PCIe", r"\bh100\b.*\bpcie",
          "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column" + _HALVED,
          fp64=51, fp32=51, tf32=378, bf16=756.5, fp16=756.5, fp8=1513, int8=1513),
    # CUDA names the SXM5 part "NVIDIA H100 80GB HBM3"; any other H100 name lands here too.
    _peak("H100 SXM", r"\bh100\b",
          "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column" + _HALVED,
          fp64=67, fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979, int8=1979),
    _peak("A100", r"\ba100\b",
          "NVIDIA A100 Tensor Core GPU datasheet (dense figures; the same for SXM and PCIe, 40 and 80 GB)",
          fp64=19.5, fp32=19.5, tf32=156, bf16=312, fp16=312, int8=624),
    _peak("A40", r"\ba40\b",
          "NVIDIA A40 datasheet (dense figures)",
          fp32=37.4, tf32=74.8, bf16=149.7, fp16=149.7, int8=299.3),
    # Not the A10G of Amazon EC2 G5 instances, for which NVIDIA publishes no datasheet.
    _peak("A10", r"\ba10\b",
          "NVIDIA A10 Tensor Core GPU datasheet (dense figures)",
          fp32=31.2, tf32=62.5, bf16=125, fp16=125, int8=250),
    _peak("L40S", r"\bl40s\b",
          "NVIDIA L40S GPU datasheet (dense figures)",
          fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733, int8=733),
    _peak("L40", r"\bl40\b",
          "NVIDIA L40 GPU datasheet (dense figures)",
          fp32=90.5, tf32=90.5, bf16=181.05, fp16=181.05, fp8=362, int8=362),
    _peak("L4", r"\bl4\b",
          "NVIDIA L4 Tensor Core GPU datasheet" + _HALVED,
          fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5, int8=242.5),
    # GeForce parts run fp16/bf16 with fp32 accumulation (what autocast does) at half the rate of
    # fp16 accumulation: these are the fp32-accumulate figures.
    _peak("GeForce RTX 4090", r"\brtx 4090\b",
          "NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090 (dense, FP32 accumulate)",
          fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3, int8=660.6),
    _peak("GeForce RTX 3090", r"\brtx 3090\b",
          "NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090 (dense, FP32 accumulate)",
          fp32=35.6, tf32=35.6, bf16=71, fp16=71, int8=284),
    _peak("V100S PCIe", r"\bv100s\b",
          "NVIDIA V100 Tensor Core GPU datasheet, V100S PCIe column",
          fp64=8.2, fp32=16.4, fp16=130),
    _peak("V100 PCIe", r"\bv100\b.*\bpcie",
          "NVIDIA V100 Tensor Core GPU datasheet, V100 PCIe column",
          fp64=7, fp32=14, fp16=112),
    _peak("V100 SXM2", r"\bv100\b",
          "NVIDIA V100 Tensor Core GPU datasheet, V100 SXM2 column",
          fp64=7.8, fp32=15.7, fp16=125),
    _peak("T4", r"\bt4\b",
          "NVIDIA T4 Tensor Core GPU datasheet (fp16: the mixed-precision FP16/FP32 figure)",
          fp32=8.1, fp16=65, int8=130),
    # The MI325X has the MI300X's compute dies and clocks, hence the same peaks.
    _peak("AMD Instinct MI300X / MI325X", r"\bmi3(00|25)x\b",
          "AMD Instinct MI300X and MI325X accelerator data sheets (dense matrix-core figures)",
          fp64=163.4, fp32=163.4, tf32=653.7, bf16=1307.4, fp16=1307.4, fp8=2614.9, int8=2614.9),
)
# fmt: on

_FP8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def _peak_key(dtype: torch.dtype | Literal["tf32"], device_type: str) -> PeakKey | None:
    if dtype == "tf32":
        return "tf32"
    if dtype == torch.float32:
        # float32 matmuls run on TF32 tensor cores when the user allowed it (set_float32_matmul_
        # precision("high") or "medium"); only then is the TF32 peak the right denominator.
        tf32 = device_type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return "tf32" if tf32 else "fp32"
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype in _FP8_DTYPES:
        return "fp8"
    if dtype == torch.int8:
        return "int8"
    return None


def _find_peak(device_name: str) -> _Peak | None:
    lowered = device_name.lower()
    return next((peak for peak in _PEAKS if re.search(peak.pattern, lowered)), None)


def get_available_flops(device: torch.device | str, dtype: torch.dtype | Literal["tf32"]) -> float | None:
    """The dense peak FLOP/s of ``device`` for ``dtype``, from a table of vendor datasheet figures.

    ``torch.float32`` means the plain FP32 peak, or the TF32 tensor-core peak on CUDA when
    ``torch.get_float32_matmul_precision()`` is ``"high"`` or ``"medium"``; pass ``"tf32"`` to ask
    for it directly. Sparse ("with sparsity") figures are never used.

    Args:
        device: The device whose peak is wanted, e.g. ``fabric.device``.
        dtype: The dtype the model computes in (``torch.bfloat16`` for ``"bf16-mixed"``).

    Returns:
        FLOP/s (operations per second for int8), or ``None`` when the peak is not known: on the
        CPU and MPS (logged at DEBUG level), for a GPU that is not in the table, or for a dtype
        the table has no figure for on that GPU (both with a warning naming the device). Pass
        ``available_flops=`` to :class:`~handloom.utilities.ThroughputMonitor` in those cases.
    """
    device = torch.device(device)
    if device.type != "cuda":
        _log.debug("No peak FLOPs are known for %s devices; MFU will not be reported.", device.type)
        return None
    name = torch.cuda.get_device_name(device)
    peak = _find_peak(name)
    if peak is None:
        warnings.warn(
            f"get_available_flops() does not know the peak FLOPs of the GPU {name!r}, so MFU cannot be"
            " computed. Pass the dense peak from its datasheet, e.g."
            " ThroughputMonitor(fabric, available_flops=312e12).",
            stacklevel=2,
        )
        return None
    key = _peak_key(dtype, device.type)
    tflops = peak.tflops.get(key) if key is not None else None
    if tflops is None:
        known = ", ".join(peak.tflops)
        warnings.warn(
            f"get_available_flops(dtype={dtype}) has no peak for {dtype} on the GPU {name!r}"
            f" ({peak.name}: the table has {known}). Pass available_flops= explicitly if the GPU"
            " runs this dtype natively.",
            stacklevel=2,
        )
        return None
    return tflops * 1e12


def measure_flops(
    model: nn.Module,
    forward_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Count the FLOPs of one forward pass (and backward pass, with ``loss_fn``) with torch's counter.

    Counting uses ``torch.utils.flop_counter.FlopCounterMode``, so only operations it has formulas
    for count (matrix multiplications, convolutions, attention), which is what MFU conventionally
    means. Build the model on the meta device (``torch.device("meta")`` or
    ``fabric.init_module(empty_init=True)``) to count without allocating or computing anything.
    The backward pass computes only the gradients autograd needs: a layer whose input does not
    require grad (usually the first) costs 1x its forward in backward instead of 2x, so a whole
    step counts slightly under the 3x-forward rule of thumb. The model's ``.grad`` attributes are
    left as they were.

    Args:
        model: The model ``forward_fn`` runs (kept for Lightning compatibility; its gradients are
            restored after the backward pass).
        forward_fn: Runs one forward pass and returns its output, e.g. ``lambda: model(x)``.
        loss_fn: Turns that output into a scalar loss; when given, the backward pass is counted too.

    Returns:
        The number of floating-point operations.

    Raises:
        ValueError: ``loss_fn`` was given but its result does not require grad, so there is no
            backward pass to count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    saved_grads = [(param, param.grad) for param in model.parameters()]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            output = forward_fn()
            if loss_fn is not None:
                loss = loss_fn(output)
                if not loss.requires_grad:
                    raise ValueError(
                        "measure_flops(loss_fn=...) was asked to count the backward pass, but the loss"
                        " does not require grad (no parameter of the model requires grad, or"
                        " forward_fn runs under torch.no_grad()). Leave out loss_fn to count the"
                        " forward pass only."
                    )
                torch.autograd.backward(loss)
    finally:
        for param, grad in saved_grads:
            param.grad = grad
    return int(counter.get_total_flops())
