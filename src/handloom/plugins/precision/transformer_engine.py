"""FP8 training with NVIDIA Transformer Engine (Hopper and newer GPUs)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from typing_extensions import override

from handloom.amp import cast_module, default_dtype
from handloom.plugins.precision.bitsandbytes import _linear_replaced_by
from handloom.plugins.precision.precision import _CastingPrecision

_NEEDS = (
    "TransformerEnginePrecision needs NVIDIA Transformer Engine and a GPU with FP8 support (Hopper,"
    " e.g. H100/H200, or newer)."
)


def _import_te() -> Any:
    if importlib.util.find_spec("transformer_engine") is None:
        raise ModuleNotFoundError(
            f"{_NEEDS} The transformer_engine package is not installed: install it with"
            " `pip install 'transformer_engine[pytorch]'` on a CUDA machine, or use precision='bf16-mixed'."
        )
    import transformer_engine.pytorch as te  # type: ignore[import-not-found]

    return te


class TransformerEnginePrecision(_CastingPrecision):
    """Train with FP8 matrix multiplications through Transformer Engine's ``fp8_autocast``.

    Args:
        weights_dtype: The dtype of the weights (``torch.bfloat16`` or ``torch.float16``; float32 works).
        recipe: Transformer Engine's ``DelayedScaling`` recipe, or a dict of its arguments
            (``"fp8_format"`` may be given by name, e.g. ``"HYBRID"``).
        replace_layers: Replace ``torch.nn.Linear`` and ``torch.nn.LayerNorm`` with Transformer
            Engine's layers (default: when the model has none of them yet).
        fallback_compute_dtype: The autocast dtype for operations FP8 does not cover (default:
            ``weights_dtype``).

    Raises:
        ModuleNotFoundError: transformer_engine is not installed (it needs a CUDA GPU).
    """

    precision = "transformer-engine"

    def __init__(
        self,
        *,
        weights_dtype: torch.dtype,
        recipe: Mapping[str, Any] | Any | None = None,
        replace_layers: bool | None = None,
        fallback_compute_dtype: torch.dtype | None = None,
    ) -> None:
        _import_te()
        from transformer_engine.common import recipe as te_recipe  # type: ignore[import-not-found]

        if recipe is None:
            recipe = te_recipe.DelayedScaling()
        elif isinstance(recipe, Mapping):
            arguments = dict(recipe)
            if isinstance(arguments.get("fp8_format"), str):
                arguments["fp8_format"] = getattr(te_recipe.Format, arguments["fp8_format"])
            recipe = te_recipe.DelayedScaling(**arguments)
        self.weights_dtype = weights_dtype
        self.dtype = weights_dtype
        self.recipe = recipe
        self.replace_layers = replace_layers
        self.fallback_compute_dtype = fallback_compute_dtype or weights_dtype

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        te = _import_te()
        has_te = any("transformer_engine" in type(m).__module__ for m in module.modules())
        if has_te and self.replace_layers is True:
            raise ValueError(
                "TransformerEnginePrecision(replace_layers=True) found Transformer Engine layers in the"
                " model already. Pass replace_layers=False, or build the model with torch.nn layers."
            )
        if not has_te and self.replace_layers in (None, True):
            _replace_with_te_layers(module, te)
        return cast_module(module, self.weights_dtype) if self.weights_dtype in _CASTABLE else module

    @override
    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.weights_dtype)

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        stack = ExitStack()
        stack.enter_context(default_dtype(self.weights_dtype))
        if self.replace_layers:
            stack.enter_context(_linear_replaced_by(_import_te().Linear))
        return stack

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        te = _import_te()
        stack = ExitStack()
        stack.enter_context(default_dtype(self.weights_dtype))
        stack.enter_context(torch.autocast("cuda", dtype=self.fallback_compute_dtype))
        stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self.recipe))
        return stack


_CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _replace_with_te_layers(module: torch.nn.Module, te: Any) -> None:
    """Swap Linear layers whose sizes FP8 supports (multiples of 8 and 16) and LayerNorms for TE's."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            if child.in_features % 8 or child.out_features % 16:
                continue  # FP8 GEMMs need these alignments: the layer stays as it is
            replacement = te.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                replacement.weight.copy_(child.weight)
                if child.bias is not None:
                    replacement.bias.copy_(child.bias)
            module._modules[name] = replacement
        elif isinstance(child, torch.nn.LayerNorm) and len(child.normalized_shape) == 1:
            replacement = te.LayerNorm(child.normalized_shape[0], eps=child.eps)
            with torch.no_grad():
                if child.weight is not None:
                    replacement.weight.copy_(child.weight)
                if child.bias is not None and replacement.bias is not None:
                    replacement.bias.copy_(child.bias)
            module._modules[name] = replacement
        else:
            _replace_with_te_layers(child, te)
