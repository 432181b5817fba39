"""Lightning's TPU environment, which handloom does not support: present for imports, refusing when used."""

from __future__ import annotations

from typing import Any, NoReturn

from typing_extensions import override

from handloom.environments.base import ClusterEnvironment

__all__ = ["XLAEnvironment"]


def _refuse() -> NoReturn:
    raise NotImplementedError(
        "XLAEnvironment() describes a TPU pod run by PyTorch/XLA, which handloom does not support."
        " handloom trains on CPU, CUDA and MPS devices through torch.distributed. Leave plugins out"
        " to detect the launcher (torchrun, SLURM, LSF, MPI, Kubeflow), or pass one of their"
        " environments."
    )


class XLAEnvironment(ClusterEnvironment):
    """Lightning's TPU-pod environment. handloom has no TPU support: :meth:`detect` is False and
    creating one raises ``NotImplementedError`` that names the alternatives.

    Raises:
        NotImplementedError: Always, when constructed.
    """

    name = "xla"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse()

    @staticmethod
    @override
    def detect() -> bool:
        """Return False: handloom never runs on a TPU pod."""
        return False

    @property
    @override
    def creates_processes_externally(self) -> bool:
        _refuse()

    @property
    @override
    def main_address(self) -> str:
        _refuse()

    @property
    @override
    def main_port(self) -> int:
        _refuse()

    @override
    def world_size(self) -> int:
        _refuse()

    @override
    def set_world_size(self, size: int) -> None:
        _refuse()

    @override
    def global_rank(self) -> int:
        _refuse()

    @override
    def set_global_rank(self, rank: int) -> None:
        _refuse()

    @override
    def local_rank(self) -> int:
        _refuse()

    @override
    def node_rank(self) -> int:
        _refuse()
