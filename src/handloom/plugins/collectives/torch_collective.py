"""Collectives over ``torch.distributed``, by name (Lightning's experimental ``TorchCollective``)."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import Self, override

from handloom.plugins.collectives.collective import Collective

__all__ = ["TorchCollective"]


class TorchCollective(Collective):
    """Collective operations with ``torch.distributed``, on the group this collective owns.

    Until :meth:`create_group` gives it a group of its own, it works on the default group. Each
    operation calls the ``torch.distributed`` function of the same name and returns the tensor
    (or list) it filled. Reductions take a ``ReduceOp`` or its name (``"sum"``, ``"max"``, ...).

    Raises:
        RuntimeError: This build of PyTorch has no ``torch.distributed``.
    """

    #: True while the default group exists because a TorchCollective's :meth:`setup` created it.
    manages_default_group: ClassVar[bool] = False
    addr_key: ClassVar[str] = "MASTER_ADDR"
    port_key: ClassVar[str] = "MASTER_PORT"
    # How many TorchCollectives own a group of their own (the default group outlives them all).
    _groups_owned: ClassVar[int] = 0

    def __init__(self) -> None:
        if not dist.is_available():
            raise RuntimeError(
                "TorchCollective() needs torch.distributed, which this build of PyTorch lacks. Install a"
                " PyTorch build with distributed support (the standard Linux, macOS and Windows wheels)."
            )
        super().__init__()

    @property
    @override
    def group(self) -> Any:
        """The group this collective owns, or the default group until it owns one."""
        if self._group is None:
            self._group = dist.GroupMember.WORLD
        return super().group

    @property
    @override
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    @override
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @override
    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        dist.broadcast(tensor, src, group=self.group)
        return tensor

    @override
    def all_reduce(self, tensor: Tensor, op: str | dist.ReduceOp = "sum") -> Tensor:
        dist.all_reduce(tensor, op=self._convert_to_native_op(op), group=self.group)
        return tensor

    @override
    def reduce(self, tensor: Tensor, dst: int, op: str | dist.ReduceOp = "sum") -> Tensor:
        dist.reduce(tensor, dst, op=self._convert_to_native_op(op), group=self.group)
        return tensor

    @override
    def all_gather(self, tensor_list: list[Tensor], tensor: Tensor) -> list[Tensor]:
        dist.all_gather(tensor_list, tensor, group=self.group)
        return tensor_list

    @override
    def gather(self, tensor: Tensor, gather_list: list[Tensor], dst: int = 0) -> list[Tensor]:
        dist.gather(tensor, gather_list, dst, group=self.group)
        return gather_list

    @override
    def scatter(self, tensor: Tensor, scatter_list: list[Tensor], src: int = 0) -> Tensor:
        dist.scatter(tensor, scatter_list, src, group=self.group)
        return tensor

    @override
    def reduce_scatter(
        self, output: Tensor, input_list: list[Tensor], op: str | dist.ReduceOp = "sum"
    ) -> Tensor:
        dist.reduce_scatter(output, input_list, op=self._convert_to_native_op(op), group=self.group)
        return output

    @override
    def all_to_all(self, output_tensor_list: list[Tensor], input_tensor_list: list[Tensor]) -> list[Tensor]:
        dist.all_to_all(output_tensor_list, input_tensor_list, group=self.group)
        return output_tensor_list

    @override
    def send(self, tensor: Tensor, dst: int, tag: int = 0) -> None:
        dist.send(tensor, dst, group=self.group, tag=tag)

    @override
    def recv(self, tensor: Tensor, src: int | None = None, tag: int = 0) -> Tensor:
        dist.recv(tensor, src, group=self.group, tag=tag)
        return tensor

    def all_gather_object(self, object_list: list[Any], obj: Any) -> list[Any]:
        """Fill ``object_list`` with every rank's picklable ``obj`` and return it."""
        dist.all_gather_object(object_list, obj, group=self.group)
        return object_list

    def broadcast_object_list(
        self, object_list: list[Any], src: int, device: torch.device | None = None
    ) -> list[Any]:
        """Overwrite ``object_list`` on every rank with rank ``src``'s and return it."""
        dist.broadcast_object_list(object_list, src, group=self.group, device=device)
        return object_list

    def gather_object(self, obj: Any, object_gather_list: list[Any], dst: int = 0) -> list[Any]:
        """Fill ``object_gather_list`` on rank ``dst`` with every rank's ``obj`` and return it."""
        dist.gather_object(obj, object_gather_list, dst, group=self.group)
        return object_gather_list

    def scatter_object_list(
        self, scatter_object_output_list: list[Any], scatter_object_input_list: list[Any], src: int = 0
    ) -> list[Any]:
        """Put this rank's entry of rank ``src``'s input list into ``scatter_object_output_list[0]``."""
        dist.scatter_object_list(scatter_object_output_list, scatter_object_input_list, src, group=self.group)
        return scatter_object_output_list

    @override
    def barrier(self, device_ids: list[int] | None = None) -> None:
        if self.group == dist.GroupMember.NON_GROUP_MEMBER:
            return
        dist.barrier(group=self.group, device_ids=device_ids)

    def monitored_barrier(
        self, timeout: datetime.timedelta | None = None, wait_all_ranks: bool = False
    ) -> None:
        """A barrier (gloo only) that names the ranks that did not reach it within ``timeout``."""
        dist.monitored_barrier(group=self.group, timeout=timeout, wait_all_ranks=wait_all_ranks)

    @override
    def setup(
        self, main_address: str | None = None, main_port: str | int | None = None, **kwargs: Any
    ) -> Self:
        """Create the default group unless it exists (``init_process_group(**kwargs)``); return ``self``.

        Args:
            main_address: Where the processes meet, unless ``MASTER_ADDR`` is set.
            main_port: The port they meet at, unless ``MASTER_PORT`` is set.
            **kwargs: For ``torch.distributed.init_process_group`` (``backend``, ``rank``,
                ``world_size``, ``timeout``, ...).
        """
        if self.is_initialized():
            return self
        # init_process_group's default rendezvous reads these two; they are removed once it has.
        added = []
        for key, value in ((self.addr_key, main_address), (self.port_key, main_port)):
            if value is not None and key not in os.environ:
                os.environ[key] = str(value)
                added.append(key)
        try:
            super().setup(**kwargs)
        finally:
            for key in added:
                os.environ.pop(key, None)
        TorchCollective.manages_default_group = True
        return self

    @override
    def create_group(self, **kwargs: Any) -> Self:
        """Give this collective a group of its own (``torch.distributed.new_group(**kwargs)``).

        Every rank of the default group calls it, as ``new_group`` requires.
        """
        super().create_group(**kwargs)
        TorchCollective._groups_owned += 1
        return self

    @override
    def teardown(self) -> Self:
        """Destroy this collective's group, and the default group when :meth:`setup` created it and no
        other TorchCollective owns a group.

        Raises:
            RuntimeError: The collective owns no group.
        """
        group = self._group  # not self.group, which would make an unowned collective own the default group
        super().teardown()
        member = group != dist.GroupMember.NON_GROUP_MEMBER
        if group is not dist.GroupMember.WORLD:
            TorchCollective._groups_owned = max(0, TorchCollective._groups_owned - 1)
        if not dist.is_initialized():
            TorchCollective.manages_default_group = False
        elif member and TorchCollective.manages_default_group and TorchCollective._groups_owned == 0:
            self.destroy_group(dist.GroupMember.WORLD)
            TorchCollective.manages_default_group = False
        return self

    @classmethod
    @override
    def is_available(cls) -> bool:
        return dist.is_available()

    @classmethod
    @override
    def is_initialized(cls) -> bool:
        return cls.is_available() and dist.is_initialized()

    @classmethod
    @override
    def init_group(cls, **kwargs: Any) -> None:
        dist.init_process_group(**kwargs)

    @classmethod
    @override
    def new_group(cls, **kwargs: Any) -> Any:
        return dist.new_group(**kwargs)

    @classmethod
    @override
    def destroy_group(cls, group: Any) -> None:
        """Destroy ``group``; a group this rank is not in, or one destroyed already, is left alone."""
        if group == dist.GroupMember.NON_GROUP_MEMBER or not dist.is_initialized():
            return
        # torch raises ValueError for a group it no longer knows, e.g. one that went with the default group.
        with contextlib.suppress(ValueError):
            dist.destroy_process_group(group)

    @classmethod
    @override
    def _convert_to_native_op(cls, op: str | dist.ReduceOp) -> dist.ReduceOp:
        """The ``ReduceOp`` for ``op``: a ``ReduceOp`` as is, or a name such as ``"sum"`` or ``"MAX"``.

        Raises:
            ValueError: ``op`` is a name ``ReduceOp`` does not have, or neither a name nor a ``ReduceOp``.
        """
        if isinstance(op, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
            return op
        choices = "'sum', 'product', 'min', 'max', 'band', 'bor', 'bxor'"
        if not isinstance(op, str):
            raise ValueError(
                f"TorchCollective reduction op={op!r} is a {type(op).__name__}, not a name or a"
                f" torch.distributed.ReduceOp. Pass a ReduceOp or one of: {choices}."
            )
        native: dist.ReduceOp | None = getattr(dist.ReduceOp, op.upper(), None)
        if native is None:
            raise ValueError(
                f"TorchCollective reduction op={op!r} is not a torch.distributed.ReduceOp. A mean is a"
                f" sum divided by world_size. Pass a ReduceOp or one of: {choices}."
            )
        return native
