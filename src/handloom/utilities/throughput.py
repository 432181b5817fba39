"""Throughput over a sliding window: batches, samples, items (tokens) and FLOPs per second, and MFU.

:class:`Throughput` is plain bookkeeping with no communication. :class:`ThroughputMonitor` binds
it to a :class:`~handloom.Fabric`: the world size, the device's peak FLOPs for the precision in use,
and logging on rank 0.

Across ranks. Each process measures its own device (the ``device/*`` metrics). By default the
global rates (``samples_per_sec`` and the other keys without the ``device`` prefix) are the
device rates times the world size, as in Lightning: free, and exact when every rank processes the
same amount of data per step, which DDP and FSDP with a ``DistributedSampler`` do. When ranks
differ (uneven batches, variable-length sequences, packing), ask for the true global rates with
``monitor.compute(sync=True)``: one ``all_reduce`` of four numbers sums the ranks' own rates. It is
a collective, so every rank must make that call at the same point of the loop; ``update`` never
communicates.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from handloom.utilities.flops import get_available_flops, measure_flops

if TYPE_CHECKING:
    from handloom.fabric import Fabric

__all__ = ["Throughput", "ThroughputMonitor", "get_available_flops", "measure_flops"]

# The rates, per second, in the order they travel in the cross-rank all_reduce.
_RATE_KEYS = ("batches_per_sec", "samples_per_sec", "items_per_sec", "flops_per_sec")


@dataclass(frozen=True, slots=True)
class _Point:
    time: float
    batches: int
    samples: int
    lengths: int | None
    flops: float | None


class Throughput:
    """Rates over the last ``window_size`` calls to :meth:`update`, for one device.

    Rates appear in :meth:`compute` once the window is full (``window_size`` updates), so the
    first, slow steps (compilation, allocator warm-up) leave it before anything is reported.

    Args:
        available_flops: The device's peak FLOP/s for the dtype in use (see
            :func:`~handloom.utilities.get_available_flops`); enables ``device/mfu``.
        world_size: Number of processes; above 1, global rates are added as the device rates
            times ``world_size`` (every rank is assumed to match this one).
        window_size: Number of updates the rates are computed over; at least 2.
        separator: Joins the ``device`` prefix to a metric name.

    Raises:
        ValueError: ``world_size`` is below 1, ``window_size`` below 2 or ``available_flops`` not
            positive.

    Example::

        throughput = Throughput(available_flops=312e12, window_size=50)
        start = time.perf_counter()
        for step, batch in enumerate(loader, start=1):
            train_step(batch)
            throughput.update(time=time.perf_counter() - start, batches=step, samples=step * batch_size)
        print(throughput.compute()["device/samples_per_sec"])
    """

    def __init__(
        self,
        available_flops: float | None = None,
        world_size: int = 1,
        window_size: int = 100,
        separator: str = "/",
    ) -> None:
        if world_size < 1:
            raise ValueError(
                f"Throughput(world_size={world_size}) must be at least 1: it is the number of processes"
                " in the job. Pass world_size=fabric.world_size, or leave the default 1 for one process."
            )
        if window_size < 2:
            raise ValueError(
                f"Throughput(window_size={window_size}) cannot hold a time interval: a rate needs two"
                " updates. Pass window_size=2 or more."
            )
        if available_flops is not None and available_flops <= 0:
            raise ValueError(
                f"Throughput(available_flops={available_flops}) must be a positive number of FLOP/s"
                " (e.g. 312e12 for an A100 in bf16), or None to leave out MFU."
            )
        self.available_flops = available_flops
        self.world_size = world_size
        self.window_size = window_size
        self.separator = separator
        self._points: deque[_Point] = deque(maxlen=window_size)

    def update(
        self,
        *,
        time: float,
        batches: int,
        samples: int,
        lengths: int | None = None,
        flops: float | None = None,
    ) -> None:
        """Record the running totals at this point of the loop. No device synchronisation happens.

        Args:
            time: Seconds elapsed since the start (e.g. ``time.perf_counter() - start``).
            batches: Batches processed on this device since the start.
            samples: Samples processed on this device since the start.
            lengths: Items (tokens) processed on this device since the start; enables
                ``device/items_per_sec``.
            flops: FLOPs this device ran since the previous update (not a running total), e.g.
                ``measure_flops(...)`` per batch times the batches since then; enables
                ``device/flops_per_sec`` and ``device/mfu``.

        Raises:
            ValueError: A running total did not grow since the previous update (as in Lightning,
                each of ``time``, ``batches``, ``samples`` and ``lengths`` must be larger than
                before), ``samples`` is smaller than ``batches``, ``lengths`` smaller than
                ``samples``, or ``flops`` negative.
            RuntimeError: ``lengths`` is given after an update without it (since the last
                :meth:`reset`): the items rate would cover only part of the window.
        """
        previous = self._points[-1] if self._points else None
        if previous is not None:
            totals = [("time", time, previous.time), ("batches", batches, previous.batches)]
            totals.append(("samples", samples, previous.samples))
            if lengths is not None and previous.lengths is not None:
                totals.append(("lengths", lengths, previous.lengths))
            # Smaller first: a total that went down is the likelier mistake (per-step counts).
            for name, value, before in totals:
                _check_not_smaller(name, value, before)
            for name, value, before in totals:
                _check_grew(name, value, before)
            if lengths is not None and previous.lengths is None:
                raise RuntimeError(
                    f"Throughput.update(lengths={lengths}) follows an update without lengths, so the"
                    " items rate would cover only part of the window. Pass lengths in every update"
                    " (or in none), or call reset() before the first update with lengths."
                )
        if samples < batches:
            raise ValueError(
                f"Throughput.update(batches={batches}, samples={samples}) counts fewer samples than"
                " batches. Pass the number of samples (batches times the batch size), not of batches."
            )
        if lengths is not None and lengths < samples:
            raise ValueError(
                f"Throughput.update(samples={samples}, lengths={lengths}) counts fewer items than"
                " samples. lengths is the running total of items (e.g. tokens) in those samples."
            )
        if flops is not None and flops < 0:
            raise ValueError(
                f"Throughput.update(flops={flops}) is negative. flops is the number of FLOPs this device"
                " ran since the previous update, e.g. measure_flops(...) times the batches since then."
            )
        self._points.append(_Point(float(time), batches, samples, lengths, flops))

    def compute(self) -> dict[str, float]:
        """The latest totals and, once the window is full, the rates over it.

        Returns:
            ``time``, ``batches``, ``samples`` and ``lengths`` (when given) from the last update;
            ``device/batches_per_sec``, ``device/samples_per_sec``, ``device/items_per_sec`` (with
            ``lengths``), ``device/flops_per_sec`` (with ``flops``) and ``device/mfu`` (with
            ``available_flops`` as well); with ``world_size > 1`` the same rates without the
            ``device`` prefix for the whole job. Empty before the first update.
        """
        rates = self._device_rates()
        return self._metrics(rates, {key: value * self.world_size for key, value in rates.items()})

    def reset(self) -> None:
        """Forget every update, e.g. after an evaluation pause that should not count as training time."""
        self._points.clear()

    def _device_rates(self) -> dict[str, float]:
        """This device's rates over the window; empty until the window is full."""
        if len(self._points) < self.window_size:
            return {}
        first, last = self._points[0], self._points[-1]
        elapsed = last.time - first.time
        if elapsed <= 0:
            return {}
        rates = {
            "batches_per_sec": (last.batches - first.batches) / elapsed,
            "samples_per_sec": (last.samples - first.samples) / elapsed,
        }
        if first.lengths is not None and last.lengths is not None:
            rates["items_per_sec"] = (last.lengths - first.lengths) / elapsed
        # Each update's flops ran before its time stamp: the first point's happened before the window.
        window_flops = [point.flops for point in list(self._points)[1:]]
        if all(flops is not None for flops in window_flops):
            rates["flops_per_sec"] = sum(flops for flops in window_flops if flops is not None) / elapsed
        return rates

    def _metrics(self, device_rates: dict[str, float], global_rates: dict[str, float]) -> dict[str, float]:
        if not self._points:
            return {}
        last = self._points[-1]
        metrics: dict[str, float] = {"time": last.time, "batches": last.batches, "samples": last.samples}
        if last.lengths is not None:
            metrics["lengths"] = last.lengths
        prefix = f"device{self.separator}"
        for key, value in device_rates.items():
            metrics[prefix + key] = value
        if "flops_per_sec" in device_rates and self.available_flops:
            metrics[prefix + "mfu"] = device_rates["flops_per_sec"] / self.available_flops
        if self.world_size > 1:
            metrics.update(global_rates)
        return metrics


def _check_not_smaller(name: str, value: float, previous: float) -> None:
    if value < previous:
        raise ValueError(
            f"Throughput.update({name}={value}) is smaller than the {name}={previous} of the previous"
            f" update. update() takes running totals since the start, not per-step values; call"
            f" reset() to start counting again."
        )


def _check_grew(name: str, value: float, previous: float) -> None:
    if value == previous:
        raise ValueError(
            f"Throughput.update({name}={value}) equals the {name} of the previous update, so no time"
            f" or work lies between the two. Call update() once per step, after the step's work,"
            f" with totals that include it."
        )


class ThroughputMonitor:
    """:class:`Throughput` for a Fabric run: world size, peak FLOPs and logging come from ``fabric``.

    The peak FLOP/s for MFU is looked up with :func:`~handloom.utilities.get_available_flops` for
    ``fabric.device`` and the precision's compute dtype (bf16 for ``"bf16-mixed"`` and
    ``"bf16-true"``, fp16 for ``"16-*"``; for ``"32-true"`` on CUDA the TF32 peak when
    ``torch.set_float32_matmul_precision("high")`` was called before, else the FP32 peak). The
    lookup's warning for an unknown GPU is shown on rank 0 only.

    :meth:`update` and :meth:`compute` work on every rank; :meth:`compute_and_log` logs on rank 0
    only. See the module documentation for how the global rates are computed.

    Args:
        fabric: A launched :class:`~handloom.Fabric`.
        window_size: Number of updates the rates are computed over; at least 2.
        separator: Joins the ``device`` prefix to a metric name.
        available_flops: The device's peak FLOP/s, instead of the table's figure (for a GPU the
            table does not know, or a measured peak).

    Raises:
        RuntimeError: ``fabric`` runs several processes that have not been launched yet.
        ValueError: An invalid ``window_size`` or ``available_flops``.

    Example::

        monitor = ThroughputMonitor(fabric, window_size=20)
        flops_per_batch = measure_flops(meta_model, lambda: meta_model(meta_x), lambda y: y.sum())
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader, start=1):
            train_step(x, y)
            monitor.update(time=time.perf_counter() - start, batches=step,
                           samples=step * len(x), flops=flops_per_batch)
            if step % 10 == 0:
                monitor.compute_and_log(step=step)
    """

    def __init__(
        self,
        fabric: Fabric,
        *,
        window_size: int = 100,
        separator: str = "/",
        available_flops: float | None = None,
    ) -> None:
        self._fabric = fabric
        device = fabric.device  # before launch(): an error saying to launch, not a world size of 1
        if available_flops is None:
            available_flops = _available_flops(fabric, device)
        self.throughput = Throughput(
            available_flops=available_flops,
            world_size=fabric.world_size,
            window_size=window_size,
            separator=separator,
        )
        self._step = -1

    @property
    def available_flops(self) -> float | None:
        """The peak FLOP/s MFU is computed against, or ``None`` when unknown."""
        return self.throughput.available_flops

    def update(
        self,
        *,
        time: float,
        batches: int,
        samples: int,
        lengths: int | None = None,
        flops: float | None = None,
    ) -> None:
        """Record this rank's running totals; see :meth:`Throughput.update`. Never communicates.

        Raises:
            ValueError: See :meth:`Throughput.update`.
        """
        self.throughput.update(time=time, batches=batches, samples=samples, lengths=lengths, flops=flops)

    def compute(self, *, sync: bool = False) -> dict[str, float]:
        """The metrics of :meth:`Throughput.compute` for this rank.

        Args:
            sync: Replace the global rates (``samples_per_sec`` etc.) by the sum of every rank's
                own rate, for ranks that process different amounts of data. This is a collective
                (one small ``all_reduce``): every rank must call it at the same point. A global
                rate is left out unless every rank has a full window.
        """
        rates = self.throughput._device_rates()
        world_size = self.throughput.world_size
        if sync and world_size > 1:
            global_rates = self._sum_across_ranks(rates)
        else:
            global_rates = {key: value * world_size for key, value in rates.items()}
        return self.throughput._metrics(rates, global_rates)

    def compute_and_log(self, step: int | None = None, *, sync: bool = False) -> dict[str, float]:
        """Compute the metrics and log them with ``fabric.log_dict`` on rank 0.

        Args:
            step: The step to log at; ``None`` means one more than the previous call's (0 at first).
            sync: See :meth:`compute`; a collective when ``True``.

        Returns:
            The metrics, on every rank.
        """
        metrics = self.compute(sync=sync)
        self._step = self._step + 1 if step is None else step
        if self._fabric.is_global_zero:
            self._fabric.log_dict(metrics, step=self._step)
        return metrics

    def reset(self) -> None:
        """Forget every update; see :meth:`Throughput.reset`."""
        self.throughput.reset()

    def _sum_across_ranks(self, rates: dict[str, float]) -> dict[str, float]:
        # Values, then how many ranks have each value: a rank whose window is not full yet (or that
        # passes no lengths or flops) must not make the sum look like the whole job's.
        values = [rates.get(key, 0.0) for key in _RATE_KEYS]
        present = [1.0 if key in rates else 0.0 for key in _RATE_KEYS]
        packed = torch.tensor(values + present, dtype=torch.float64, device=self._fabric.device)
        summed = self._fabric.all_reduce(packed, reduce_op="sum").tolist()
        world_size = self.throughput.world_size
        return {
            key: summed[index]
            for index, key in enumerate(_RATE_KEYS)
            if round(summed[len(_RATE_KEYS) + index]) == world_size
        }


def _available_flops(fabric: Fabric, device: torch.device) -> float | None:
    policy = fabric.strategy.runtime.precision
    dtype = policy.compute_dtype or policy.param_dtype or torch.float32
    if fabric.is_global_zero:
        return get_available_flops(device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 0 already says it; N copies of one warning help nobody
        return get_available_flops(device, dtype)
