"""``TensorBoardLogger``: scalars, hyperparameters and graphs as TensorBoard event files.

The writer comes from ``torch.utils.tensorboard`` (needs the ``tensorboard`` package) or, failing
that, ``tensorboardX``. Neither is imported before a logger writes: ``import handloom`` stays fast.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from typing_extensions import override

from handloom.loggers.base import _FileLogger, _flatten, _NoOpExperiment, _params_as_dict

_INSTALL = 'pip install "handloom[tensorboard]"'


def _backend() -> str:
    """The module providing ``SummaryWriter``, checked without importing it.

    Raises:
        ImportError: Neither ``tensorboard`` nor ``tensorboardX`` is installed.
    """
    if importlib.util.find_spec("tensorboard") is not None:
        return "torch.utils.tensorboard"
    if importlib.util.find_spec("tensorboardX") is not None:
        return "tensorboardX"
    raise ImportError(
        "TensorBoardLogger writes through the tensorboard package (or tensorboardX), and neither is"
        f" installed. Install it with: {_INSTALL}"
    )


class TensorBoardLogger(_FileLogger):
    """Log metrics and hyperparameters for TensorBoard under ``root_dir/name/version_N[/sub_dir]``.

    Writes on global rank 0 only. Logged tensors stay on their device in a buffer; the buffer goes
    to the ``SummaryWriter`` every ``flush_logs_every_n_steps`` rows (or after 30 s), on ``save()``,
    on ``finalize()`` and at interpreter exit, so logging every step costs one device sync per
    flush. Nested metric mappings become ``outer/inner`` scalar tags.

    Args:
        root_dir: The directory for all experiments (``~`` and environment variables are expanded
            in :attr:`log_dir` and where files go; :attr:`root_dir` shows it as written).
        name: The experiment's directory under ``root_dir``; ``""`` or ``None`` for none.
        version: An int (directory ``version_N``), a string (the directory's name), or ``None`` for
            the next free ``version_N``.
        default_hp_metric: With ``log_hyperparams(params)`` and no metrics, also log ``hp_metric = -1``
            so TensorBoard's HParams tab lists the run.
        prefix: Put in front of every metric name, joined with ``-``.
        sub_dir: An extra directory level under the version directory.
        flush_logs_every_n_steps: Hand the buffered rows to the writer every this many rows.
        **kwargs: Passed to ``SummaryWriter`` (``max_queue``, ``flush_secs``, ``filename_suffix``, ...).

    Raises:
        ImportError: Neither ``tensorboard`` nor ``tensorboardX`` is installed.
        TypeError: ``version`` or ``flush_logs_every_n_steps`` has the wrong type.
        ValueError: A negative ``version`` or a ``flush_logs_every_n_steps`` below 1.

    Example::

        logger = TensorBoardLogger("logs", name="mnist")
        fabric = Fabric(loggers=logger)
        logger.log_hyperparams({"lr": 0.1, "batch_size": 64})
        fabric.log("loss", loss, step=step)
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike[str] | None = None,
        *,
        flush_logs_every_n_steps: int = 100,
        **kwargs: Any,
    ) -> None:
        self._module = _backend()
        super().__init__(root_dir, name, version, prefix, flush_logs_every_n_steps)
        self._default_hp_metric = default_hp_metric
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._writer_kwargs = kwargs
        self._writer: Any = None
        self._writer_pid: int | None = None

    @property
    @override
    def log_dir(self) -> str:
        """``root_dir/name/version_N``, plus ``sub_dir`` if given: where the event files go.

        ``~`` and environment variables are expanded, as in Lightning's ``TensorBoardLogger``.
        """
        return self._output_dir

    @property
    @override
    def _output_dir(self) -> str:
        log_dir = super()._output_dir
        if self._sub_dir is not None:
            log_dir = os.path.join(log_dir, os.path.expandvars(os.path.expanduser(self._sub_dir)))
        return log_dir

    @property
    def sub_dir(self) -> str | None:
        """The extra directory level under the version directory, if any."""
        return self._sub_dir

    @property  # type: ignore[misc]  # read-only here; the base lets Lightning-style loggers assign it
    @override
    def experiment(self) -> Any:
        """The ``SummaryWriter`` on rank 0 (created on first use); a no-op object on other ranks."""
        if self._rank != 0:
            return _NoOpExperiment()
        if self._writer is not None and self._writer_pid != os.getpid():
            # Inherited through fork: its writer thread stayed in the parent, so start a new one.
            self._writer = None
        if self._writer is None:
            module = importlib.import_module(self._module)
            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = module.SummaryWriter(log_dir=self.log_dir, **self._writer_kwargs)
            self._writer_pid = os.getpid()
            from handloom.loggers.base import hold_until_exit

            hold_until_exit(self)
        return self._writer

    @override
    def log_hyperparams(
        self, params: Any, metrics: Mapping[str, Any] | None = None, step: int | None = None
    ) -> None:
        """Record hyperparameters for TensorBoard's HParams tab (rank 0 only).

        Nested mappings are flattened to ``outer/inner``; values other than numbers, strings and
        booleans are recorded as their ``str()``.

        Args:
            params: A mapping or an ``argparse.Namespace``.
            metrics: Metrics to show next to the hyperparameters; by default ``hp_metric = -1``
                (with ``default_hp_metric=True``).
            step: The step of those metrics (default 0).

        Raises:
            TypeError: ``params`` is neither a mapping nor a namespace.
        """
        if self._rank != 0:
            return
        flat = _flatten(_params_as_dict("TensorBoardLogger", params), self.group_separator)
        clean = {key: _hparam_value(value) for key, value in flat.items()}
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        hparams: Callable[..., Any] = importlib.import_module(f"{self._module}.summary").hparams
        writer = self.experiment
        # The HParams tab pairs each run's hyperparameters with the scalars whose tags are listed
        # here (the values are the scalars logged below), so list the tags as log_metrics writes them.
        tags = _flatten(metrics or {}, self.group_separator)
        tags = {f"{self._prefix}-{key}" if self._prefix else key: 0.0 for key in tags}
        for summary in hparams(clean, tags):
            writer.file_writer.add_summary(summary)
        if metrics:
            self.log_metrics(metrics, step=0 if step is None else step)
            self.save()

    @override
    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:
        """Record ``model``'s graph, traced with ``input_array`` (or ``model.example_input_array``).

        Raises:
            ValueError: No input was given and the model has no ``example_input_array``.
        """
        if self._rank != 0:
            return
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
        if input_array is None:
            raise ValueError(
                f"TensorBoardLogger.log_graph({type(model).__name__}) needs an input to trace the model"
                " with. Pass log_graph(model, input_array) or set model.example_input_array."
            )
        self.experiment.add_graph(getattr(model, "module", model), input_array)

    @override
    def _write_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        writer = self.experiment
        for step, row in rows:
            for key, value in row.items():
                writer.add_scalar(key, value, global_step=step)

    @override
    def save(self) -> None:
        """Hand the buffered rows to the writer and flush its event file (rank 0 only)."""
        super().save()
        if self._writer is not None and self._writer_pid == os.getpid():
            self._writer.flush()

    @override
    def _close(self) -> None:
        if self._writer is not None and self._writer_pid == os.getpid():
            self._writer.close()
        self._writer = None

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_writer"] = None  # a SummaryWriter holds a thread and cannot travel to a new process
        return state


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        item: bool | int | float = value.item()
        return item
    if isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__name__", None) or str(value)
