"""``lightning.fabric.utilities.spike``: stop training when the loss spikes.

Unlike Lightning's, this :class:`SpikeDetection` needs no torchmetrics, keeps non-finite losses
out of its running mean, and its ``load_state_dict`` works.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from handloom.fabric import Fabric

__all__ = ["SpikeDetection", "TrainingSpikeException"]

_SKIP_FILE = "skip_batches.json"


class TrainingSpikeException(RuntimeError):
    """Raised by :class:`SpikeDetection` on every process when the loss of a batch spiked."""

    def __init__(self, batch_idx: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            f"The loss spiked at batch {batch_idx}, so training stops. Batches {batch_idx - 1} and"
            f" {batch_idx} are listed in the skip file; skip them when you resume.",
            *args,
            **kwargs,
        )
        self.batch_idx = batch_idx


class SpikeDetection:
    """A callback that raises :class:`TrainingSpikeException` when the loss jumps away from its running mean.

    Call it through ``fabric.call("on_train_batch_end", loss=loss, batch=batch, batch_idx=i)``
    with the callback in ``Fabric(callbacks=[SpikeDetection()])``. A batch counts as a spike when
    its loss is not an improvement over the previous one (lower for ``mode="min"``) and differs
    from the mean of the last ``window`` losses by at least ``atol`` and by at least ``rtol``
    times that mean (a ``None`` tolerance always passes), or when it is not finite (with
    ``finite_only``). Each process checks its own loss; a spike on any process stops all. Global
    rank 0 then writes the indices of the spiking batch and the one before it (their data or
    their update may be at fault) to a JSON list, to skip when resuming.

    Args:
        mode: ``"min"`` when the loss should fall, ``"max"`` when it should rise.
        window: How many recent losses the running mean covers.
        warmup: Batches (by ``batch_idx``) before checking starts.
        atol: The smallest absolute distance from the mean that counts as a spike.
        rtol: The smallest distance from the mean, relative to it, that counts as a spike.
        exclude_batches_path: Where to write the list: a ``.json`` file, or a directory for
            ``skip_batches.json`` (the current directory by default).
        finite_only: Treat NaN and infinite losses as spikes. With ``False`` they are not, and a
            batch whose loss is not finite on some process is left out of the running mean.

    Raises:
        ValueError: ``mode`` is neither ``"min"`` nor ``"max"``, or ``window`` is below 1.
    """

    def __init__(
        self,
        mode: Literal["min", "max"] = "min",
        window: int = 10,
        warmup: int = 1,
        atol: float | None = None,
        rtol: float | None = 2.0,
        exclude_batches_path: str | os.PathLike[str] | None = None,
        finite_only: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(
                f"SpikeDetection(mode={mode!r}) is not a direction. Pass mode='min' for a loss that"
                " should fall or mode='max' for one that should rise."
            )
        if window < 1:
            raise ValueError(
                f"SpikeDetection(window={window}) leaves no loss to average. Pass window=1 or more."
            )
        self.mode = mode
        self.window = window
        self.warmup = warmup
        self.atol = atol
        self.rtol = rtol
        self.exclude_batches_path = exclude_batches_path
        self.finite_only = finite_only
        self.last_val: float = 0.0
        self.bad_batches: list[int] = []
        self._recent: deque[float] = deque(maxlen=window)

    @torch.no_grad()
    def on_train_batch_end(
        self, fabric: Fabric, loss: torch.Tensor | float, batch: Any, batch_idx: int
    ) -> None:
        """Check this batch's loss; a collective, so every process must call it for every batch.

        Raises:
            TrainingSpikeException: The loss spiked on some process.
        """
        value = float(loss)
        is_spike = batch_idx >= self.warmup and self._is_spike(value)
        strategy = fabric.strategy
        strategy.barrier()
        if strategy.any_rank(is_spike, "SpikeDetection"):
            self._handle_spike(fabric, batch_idx)
        # Without finite_only, a batch that is not finite on some process is left out everywhere.
        if self.finite_only or not strategy.any_rank(not math.isfinite(value), "SpikeDetection"):
            self._update(value)

    @property
    def running_mean(self) -> float:
        """The mean of the last ``window`` finite losses (NaN before the first)."""
        return sum(self._recent) / len(self._recent) if self._recent else math.nan

    def _is_spike(self, value: float) -> bool:
        if self.finite_only and not math.isfinite(value):
            return True
        change = value - self.last_val
        if (change <= 0) if self.mode == "min" else (change >= 0):
            return False  # an improvement is never a spike
        mean = self.running_mean
        distance = abs(value - mean)
        far_absolute = self.atol is None or distance >= abs(self.atol)
        far_relative = self.rtol is None or distance >= abs(self.rtol * mean)
        return far_absolute and far_relative

    def _update(self, value: float) -> None:
        if math.isfinite(value):
            self._recent.append(value)
        self.last_val = value

    def _skip_file(self) -> str:
        path = os.fspath(os.getcwd() if self.exclude_batches_path is None else self.exclude_batches_path)
        return path if path.endswith(".json") else os.path.join(path, _SKIP_FILE)

    def _handle_spike(self, fabric: Fabric, batch_idx: int) -> None:
        self.bad_batches.extend([batch_idx - 1, batch_idx])
        if fabric.global_rank == 0:
            path = self._skip_file()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self.bad_batches, handle, indent=4)
        raise TrainingSpikeException(batch_idx=batch_idx)

    def state_dict(self) -> dict[str, Any]:
        """The settings, the spikes so far and the running window, for ``fabric.save``."""
        return {
            "last_val": self.last_val,
            "mode": self.mode,
            "warmup": self.warmup,
            "atol": self.atol,
            "rtol": self.rtol,
            "bad_batches": list(self.bad_batches),
            "bad_batches_path": None
            if self.exclude_batches_path is None
            else os.fspath(self.exclude_batches_path),
            "window": self.window,
            "recent": list(self._recent),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.last_val = float(state_dict["last_val"])
        self.mode = state_dict["mode"]
        self.warmup = state_dict["warmup"]
        self.atol = state_dict["atol"]
        self.rtol = state_dict["rtol"]
        self.bad_batches = list(state_dict["bad_batches"])
        self.exclude_batches_path = state_dict["bad_batches_path"]
        self.window = int(state_dict.get("window", self.window))
        self._recent = deque(state_dict.get("recent", []), maxlen=self.window)
