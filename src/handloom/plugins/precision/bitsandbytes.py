"""Weight quantization with bitsandbytes: 4-bit (NF4, FP4, optionally double-quantized) and 8-bit layers.

The plugin replaces the model's ``torch.nn.Linear`` layers by bitsandbytes layers and quantizes
their weights on the device they live on. bitsandbytes 0.45 and newer quantize on the CPU as well
as on CUDA, so unlike Lightning (CUDA only) this also runs on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from types import ModuleType
from typing import Any, Literal

import torch
from typing_extensions import override

from handloom.amp import default_dtype
from handloom.plugins.precision.precision import _CastingPrecision

_Mode = Literal["nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training"]
_MODES: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "int8-training")


@functools.lru_cache(maxsize=1)
def _import_bitsandbytes() -> ModuleType:
    quiet = "BITSANDBYTES_NOWELCOME" not in os.environ
    if quiet:  # no banner on import
        os.environ["BITSANDBYTES_NOWELCOME"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compiled without GPU support.*")
            import bitsandbytes
    except ImportError as error:
        raise ModuleNotFoundError(
            "BitsandbytesPrecision needs the bitsandbytes package, which is not installed."
            " Install it with `pip install 'bitsandbytes>=0.45'` (it quantizes on CUDA GPUs and on the CPU)."
        ) from error
    finally:
        if quiet:
            del os.environ["BITSANDBYTES_NOWELCOME"]
    return bitsandbytes


@functools.lru_cache(maxsize=1)
def _layer_classes() -> dict[str, type[torch.nn.Module]]:
    """The quantizing Linear classes, one per mode (built once bitsandbytes is imported)."""
    bnb = _import_bitsandbytes()

    class _QuantizingLinear4bit(bnb.nn.Linear4bit):  # type: ignore[misc,name-defined]
        """A 4-bit Linear that quantizes any full-precision weight it is given: at creation on a
        real device, and when a state dict with a full-precision weight is loaded."""

        _quant_type = "nf4"
        _double_quant = False

        def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: Any) -> None:
            kwargs.pop("dtype", None)
            super().__init__(
                in_features,
                out_features,
                bias=bias,
                quant_type=self._quant_type,
                compress_statistics=self._double_quant,
                **kwargs,
            )
            if self.weight.device.type != "meta":
                self.quantize_(self.weight.data)

        def quantize_(self, weight: torch.Tensor) -> None:
            """Replace the weight by ``weight`` quantized on this layer's device."""
            device = weight.device if weight.device.type != "meta" else torch.device("cpu")
            params = bnb.nn.Params4bit(
                weight.detach().to(device),
                requires_grad=False,
                quant_type=self._quant_type,
                compress_statistics=self._double_quant,
                module=self,
            )
            self.weight = params.to(device)

        def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            load = super()._load_from_state_dict
            _load_quantizing(self, load, state_dict, prefix, args, quantize=True)

    class _QuantizingLinear8bit(bnb.nn.Linear8bitLt):  # type: ignore[misc,name-defined]
        """An 8-bit Linear (LLM.int8()) that quantizes the full-precision weight it is given."""

        _trainable = False

        def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs: Any) -> None:
            kwargs.pop("dtype", None)
            super().__init__(in_features, out_features, bias=bias, has_fp16_weights=self._trainable, **kwargs)
            if self.weight.device.type != "meta":
                self.quantize_(self.weight.data)

        def quantize_(self, weight: torch.Tensor) -> None:
            """Replace the weight by ``weight`` quantized to int8 on this layer's device."""
            device = weight.device if weight.device.type != "meta" else torch.device("cpu")
            params = bnb.nn.Int8Params(
                weight.detach().to(device, torch.float16),
                requires_grad=self._trainable,
                has_fp16_weights=self._trainable,
            )
            self.weight = params.to(device)

        def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            load = super()._load_from_state_dict
            _load_quantizing(self, load, state_dict, prefix, args, quantize=not self._trainable)

    def four_bit(quant_type: str, double_quant: bool) -> type[torch.nn.Module]:
        name = f"{quant_type.upper()}{'DQ' if double_quant else ''}Linear"
        return type(
            name, (_QuantizingLinear4bit,), {"_quant_type": quant_type, "_double_quant": double_quant}
        )

    return {
        "nf4": four_bit("nf4", False),
        "nf4-dq": four_bit("nf4", True),
        "fp4": four_bit("fp4", False),
        "fp4-dq": four_bit("fp4", True),
        "int8": type("Int8LinearInference", (_QuantizingLinear8bit,), {"_trainable": False}),
        "int8-training": type("Int8LinearTraining", (_QuantizingLinear8bit,), {"_trainable": True}),
    }


class BitsandbytesPrecision(_CastingPrecision):
    """Quantize the weights of every ``torch.nn.Linear`` with bitsandbytes.

    The optimizer is not replaced (use ``bitsandbytes.optim`` yourself for 8-bit optimizers).

    Args:
        mode: ``"nf4"``, ``"nf4-dq"``, ``"fp4"``, ``"fp4-dq"`` (4-bit; ``-dq`` also quantizes the
            quantization constants), ``"int8"`` (inference) or ``"int8-training"``.
        dtype: The compute dtype. Default: float16 for the int8 modes; bfloat16 for the 4-bit modes
            where CUDA supports it, else float16.
        ignore_modules: Names (prefixes) of submodules whose Linear layers stay as they are, e.g.
            ``{"lm_head"}``.

    Raises:
        ModuleNotFoundError: bitsandbytes is not installed.
        ValueError: An unknown mode, or an int8 mode with a dtype other than float16.
    """

    def __init__(
        self,
        mode: _Mode,
        dtype: torch.dtype | None = None,
        ignore_modules: set[str] | None = None,
    ) -> None:
        _import_bitsandbytes()
        if mode not in _MODES:
            raise ValueError(
                f"BitsandbytesPrecision(mode={mode!r}) is not a quantization mode."
                f" Choose one of: {', '.join(repr(m) for m in _MODES)}."
            )
        if dtype is None:
            if mode.startswith("int8"):
                dtype = torch.float16
            else:
                bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                dtype = torch.bfloat16 if bf16 else torch.float16
        if mode.startswith("int8") and dtype is not torch.float16:
            raise ValueError(
                f"BitsandbytesPrecision(mode={mode!r}, dtype={dtype}): bitsandbytes' int8 layers compute"
                " in float16 only. Pass dtype=torch.float16 or leave dtype unset."
            )
        self.mode = mode
        self.dtype = dtype
        self.ignore_modules = set(ignore_modules or ())
        self._linear_cls = _layer_classes()[mode]

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Replace the Linear layers (except under ``ignore_modules``) by quantized ones, in place."""
        if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
            raise TypeError(
                f"BitsandbytesPrecision quantizes torch.nn.Linear layers, and {type(module).__name__} has"
                " none. Use another precision for this model."
            )
        bnb = _import_bitsandbytes()
        already = any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in module.modules())
        if not already:
            self._replace_linears(module, "")
        for layer in module.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.compute_dtype = self.dtype
                layer.compute_type_is_set = True
        return module

    def _replace_linears(self, module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(path.startswith(ignored) for ignored in self.ignore_modules):
                continue
            if isinstance(child, torch.nn.Linear):
                with torch.device("meta"):
                    replacement = self._linear_cls(
                        child.in_features, child.out_features, bias=child.bias is not None
                    )
                replacement.quantize_(child.weight.data)  # type: ignore[operator]
                if child.bias is not None:
                    replacement.bias = torch.nn.Parameter(
                        child.bias.data.to(self.dtype), requires_grad=child.bias.requires_grad
                    )
                module._modules[name] = replacement
            else:
                self._replace_linears(child, path + ".")

    @override
    def tensor_init_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    @override
    def module_init_context(self) -> AbstractContextManager[Any]:
        """Build modules in the compute dtype, with quantized layers in place of ``torch.nn.Linear``.

        Raises:
            RuntimeError: ``ignore_modules`` is set (the layers to keep cannot be told apart while
                the model is built).
        """
        if self.ignore_modules:
            raise RuntimeError(
                f"fabric.init_module() with BitsandbytesPrecision(ignore_modules={self.ignore_modules}) would"
                " quantize the layers meant to be kept. Build the model outside init_module(), or drop"
                " ignore_modules."
            )
        stack = ExitStack()
        stack.enter_context(default_dtype(self.dtype))
        stack.enter_context(_linear_replaced_by(self._linear_cls))
        return stack

    @override
    def forward_context(self) -> AbstractContextManager[Any]:
        return default_dtype(self.dtype)

    @override
    def __repr__(self) -> str:
        return f"BitsandbytesPrecision(mode={self.mode!r}, dtype={self.dtype})"


def _load_quantizing(
    layer: Any, load: Any, state_dict: dict[str, Any], prefix: str, args: tuple[Any, ...], quantize: bool
) -> None:
    """Load ``state_dict`` into a quantizing layer: a full-precision weight is quantized (on the
    layer's device, or the weight's when the layer is on meta) instead of copied."""
    key = prefix + "weight"
    weight = state_dict.get(key)
    if not (quantize and isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        load(state_dict, prefix, *args)
        return
    home = layer.weight.device if layer.weight.device.type != "meta" else weight.device
    layer.quantize_(weight.to(home))
    load({k: v for k, v in state_dict.items() if k != key}, prefix, *args)
    missing = args[2] if len(args) > 2 else None  # (metadata, strict, missing, unexpected, errors)
    if isinstance(missing, list) and key in missing:
        missing.remove(key)


@contextlib.contextmanager
def _linear_replaced_by(cls: type[torch.nn.Module]) -> Iterator[None]:
    """Make ``torch.nn.Linear`` (as models reach it) build ``cls`` inside the block."""
    original = torch.nn.Linear
    torch.nn.Linear = cls  # type: ignore[misc,assignment]
    torch.nn.modules.linear.Linear = cls  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        torch.nn.Linear = original  # type: ignore[misc]
        torch.nn.modules.linear.Linear = original  # type: ignore[misc]
