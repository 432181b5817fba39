"""Lightning's TPU checkpoint writer, which handloom does not support: importable, refusing when used."""

from __future__ import annotations

from typing import Any

from handloom.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["XLACheckpointIO"]


class XLACheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer for TPUs (``xm.save``). handloom has no TPU support, so creating
    one raises ``NotImplementedError``; :class:`TorchCheckpointIO` writes the same files from CPU
    and CUDA training.

    Raises:
        NotImplementedError: Always, when constructed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "XLACheckpointIO() saves checkpoints from TPUs through PyTorch/XLA, which handloom does not"
            " support. handloom trains on CPU, CUDA and MPS devices. Leave the plugin out: fabric.save"
            " writes the same torch.save files through TorchCheckpointIO."
        )
