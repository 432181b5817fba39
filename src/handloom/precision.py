"""Precision choices as plain data: parse what the user wrote into a frozen policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

PrecisionName = Literal["32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
PRECISION_NAMES: tuple[str, ...] = get_args(PrecisionName)
_ALIASES: dict[str | int, PrecisionName] = {
    "32": "32-true",
    32: "32-true",
    "64": "64-true",
    64: "64-true",
    "16": "16-mixed",
    16: "16-mixed",
    "bf16": "bf16-mixed",
}
# Every spelling the constructor and the CLI accept.
PRECISION_INPUTS: tuple[str, ...] = (*PRECISION_NAMES, "64", "32", "16", "bf16")


@dataclass(frozen=True, slots=True)
class PrecisionPolicy:
    """What a precision choice means, independent of the strategy that realises it.

    Attributes:
        name: The canonical precision string.
        param_dtype: The dtype module parameters are cast to, or ``None`` to keep them as built.
        compute_dtype: The autocast dtype for ``*-mixed``, ``None`` otherwise.
        grad_scaling: True when losses must be scaled (fp16 mixed precision).
    """

    name: PrecisionName
    param_dtype: torch.dtype | None
    compute_dtype: torch.dtype | None
    grad_scaling: bool

    @property
    def is_mixed(self) -> bool:
        """True for ``16-mixed`` and ``bf16-mixed``."""
        return self.compute_dtype is not None

    @property
    def is_default(self) -> bool:
        """True for ``32-true``: nothing to cast, nothing to scale."""
        return self.param_dtype is None and self.compute_dtype is None


def resolve_precision_name(value: object) -> PrecisionName:
    """Map what the user wrote (canonical string, legacy alias or int) to a canonical name.

    Raises:
        ValueError: ``value`` is not a known precision.
    """
    if value is None:
        return "32-true"
    if isinstance(value, str) and value in PRECISION_NAMES:
        return value  # type: ignore[return-value]
    if isinstance(value, (str, int)) and not isinstance(value, bool) and value in _ALIASES:
        return _ALIASES[value]
    choices = ", ".join(repr(name) for name in PRECISION_NAMES)
    raise ValueError(
        f"Fabric(precision={value!r}) is not a known precision. Choose one of: {choices}"
        " (or the legacy aliases '32', '64', '16', 'bf16')."
    )


def build_precision_policy(name: PrecisionName) -> PrecisionPolicy:
    """Return the policy for a canonical precision name."""
    if name == "32-true":
        return PrecisionPolicy(name, None, None, False)
    if name == "64-true":
        return PrecisionPolicy(name, torch.float64, None, False)
    if name == "16-true":
        return PrecisionPolicy(name, torch.float16, None, False)
    if name == "bf16-true":
        return PrecisionPolicy(name, torch.bfloat16, None, False)
    if name == "16-mixed":
        return PrecisionPolicy(name, None, torch.float16, True)
    return PrecisionPolicy(name, None, torch.bfloat16, False)
