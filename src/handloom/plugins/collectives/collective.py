"""The interface of a collective that owns a process group (Lightning's experimental ``Collective``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor
from typing_extensions import Self

__all__ = ["Collective"]


class Collective(ABC):
    """Collective operations between processes, over a group the collective owns.

    :meth:`setup` joins (or creates) the default group; :meth:`create_group` gives the collective
    a group of its own, which :meth:`teardown` destroys.

    Example::

        collective = TorchCollective().setup(backend="gloo", rank=rank, world_size=2,
                                             main_address="127.0.0.1", main_port=29500)
        collective.create_group()
        collective.all_reduce(tensor, op="sum")
        collective.teardown()
    """

    def __init__(self) -> None:
        self._group: Any = None

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's rank in the group."""

    @property
    @abstractmethod
    def world_size(self) -> int:
        """The number of processes in the group."""

    @property
    def group(self) -> Any:
        """The group this collective owns.

        Raises:
            RuntimeError: It owns none yet.
        """
        if self._group is None:
            raise RuntimeError(
                f"{type(self).__name__}().group was read before the collective owned a group."
                " A collective owns one after create_group(). Call collective.create_group() first."
            )
        return self._group

    @abstractmethod
    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s and return it."""

    @abstractmethod
    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Reduce ``tensor`` over all ranks in place and return it."""

    @abstractmethod
    def reduce(self, tensor: Tensor, dst: int, op: str) -> Tensor:
        """Reduce ``tensor`` over all ranks into rank ``dst``'s and return it."""

    @abstractmethod
    def all_gather(self, tensor_list: list[Tensor], tensor: Tensor) -> list[Tensor]:
        """Fill ``tensor_list`` with every rank's ``tensor`` and return it."""

    @abstractmethod
    def gather(self, tensor: Tensor, gather_list: list[Tensor], dst: int = 0) -> list[Tensor]:
        """Fill ``gather_list`` on rank ``dst`` with every rank's ``tensor`` and return it."""

    @abstractmethod
    def scatter(self, tensor: Tensor, scatter_list: list[Tensor], src: int = 0) -> Tensor:
        """Fill ``tensor`` with this rank's entry of rank ``src``'s ``scatter_list`` and return it."""

    @abstractmethod
    def reduce_scatter(self, output: Tensor, input_list: list[Tensor], op: str) -> Tensor:
        """Reduce ``input_list`` over all ranks; fill ``output`` with this rank's part and return it."""

    @abstractmethod
    def all_to_all(self, output_tensor_list: list[Tensor], input_tensor_list: list[Tensor]) -> list[Tensor]:
        """Send ``input_tensor_list[i]`` to rank ``i``; fill ``output_tensor_list`` and return it."""

    @abstractmethod
    def send(self, tensor: Tensor, dst: int, tag: int = 0) -> None:
        """Send ``tensor`` to rank ``dst``."""

    @abstractmethod
    def recv(self, tensor: Tensor, src: int | None = None, tag: int = 0) -> Tensor:
        """Receive into ``tensor`` from rank ``src`` (any rank with ``None``) and return it."""

    @abstractmethod
    def barrier(self, device_ids: list[int] | None = None) -> None:
        """Wait until every rank of the group reaches this point."""

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether this kind of collective can run here."""

    @classmethod
    @abstractmethod
    def is_initialized(cls) -> bool:
        """Whether the default group exists."""

    @classmethod
    @abstractmethod
    def init_group(cls, **kwargs: Any) -> None:
        """Create the default group."""

    @classmethod
    @abstractmethod
    def new_group(cls, **kwargs: Any) -> Any:
        """Create and return a new group."""

    @classmethod
    @abstractmethod
    def destroy_group(cls, group: Any) -> None:
        """Destroy ``group``."""

    @classmethod
    @abstractmethod
    def _convert_to_native_op(cls, op: str) -> Any:
        """The backend's reduction for the name ``op``."""

    def setup(self, **kwargs: Any) -> Self:
        """Create the default group with ``kwargs`` unless it exists; return this collective."""
        if not self.is_initialized():
            self.init_group(**kwargs)
        return self

    def create_group(self, **kwargs: Any) -> Self:
        """Give this collective a new group (``new_group(**kwargs)``) and return it.

        The default group must exist (:meth:`setup`).

        Raises:
            RuntimeError: The collective owns a group already.
        """
        if self._group is not None:
            raise RuntimeError(
                f"{type(self).__name__}().create_group() was called, but the collective already owns a"
                " group. A collective owns one group at a time. Call teardown() first, or use another"
                " collective."
            )
        self._group = self.new_group(**kwargs)
        return self

    def teardown(self) -> Self:
        """Destroy the group this collective owns and return the collective.

        Raises:
            RuntimeError: It owns no group.
        """
        if self._group is None:
            raise RuntimeError(
                f"{type(self).__name__}().teardown() was called, but the collective owns no group to"
                " destroy. It owns one after create_group(). Call teardown() once per create_group()."
            )
        self.destroy_group(self._group)
        self._group = None
        return self
