"""The ``Logger`` interface and the machinery shared by the file loggers.

Shared behaviour of :class:`~handloom.loggers.CSVLogger` and
:class:`~handloom.loggers.TensorBoardLogger`:

* Only global rank 0 writes; on other ranks every method returns at once and ``experiment`` is a
  no-op object.
* Logged tensors stay tensors (detached copies) in a buffer. The buffer is turned into Python
  numbers when it is flushed, with one ``tolist()`` per device and dtype, so logging every step
  costs one device sync per flush instead of one per value.
* The buffer is flushed every ``flush_logs_every_n_steps`` rows, after 30 seconds without a flush,
  on ``save()``, on ``finalize()``, and at interpreter exit for every logger that still holds rows.
* Versions: ``version=None`` picks ``max(existing version_N) + 1`` and reserves it by creating
  the directory (``mkdir`` fails if another job took it first, so two jobs never share one). In
  a multi-process Fabric job, rank 0 picks and the others receive its choice.
"""

from __future__ import annotations

import atexit
import numbers
import os
import re
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

_FLUSH_SECONDS = 30.0
_VERSION_DIR = re.compile(r"version_(\d+)")


class Logger(ABC):
    """Base class of a metrics logger (Lightning Fabric's ``Logger`` interface).

    Subclasses implement ``name``, ``version``, ``log_metrics`` and ``log_hyperparams``; the rest
    have defaults. Any object with a ``log_metrics(metrics, step)`` method works as a Fabric logger;
    subclassing adds these defaults and the ``isinstance`` check.
    """

    @property
    @abstractmethod
    def name(self) -> str | None:
        """The experiment's name (a directory level for file loggers)."""

    @property
    @abstractmethod
    def version(self) -> int | str | None:
        """The experiment's version (``version_N`` directory for an int)."""

    @property
    def root_dir(self) -> str | None:
        """The directory that holds all versions of this experiment, if the logger writes files."""
        return None

    @property
    def log_dir(self) -> str | None:
        """The directory this run writes to, if the logger writes files."""
        return None

    @property
    def group_separator(self) -> str:
        """The separator that joins the keys of nested metric dictionaries."""
        return "/"

    @property
    def experiment(self) -> Any:
        """The underlying writer object (``None`` when the logger has none).

        Lightning's base class has no such property, so loggers written for it may assign
        ``self.experiment = ...``; that works here too.
        """
        return self.__dict__.get("_handloom_experiment")

    @experiment.setter
    def experiment(self, value: Any) -> None:
        self.__dict__["_handloom_experiment"] = value

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record one row of metrics.

        Args:
            metrics: Metric names and their values.
            step: The training step; ``None`` lets the logger count rows.
        """

    @abstractmethod
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Record the run's hyperparameters (a mapping or an ``argparse.Namespace``)."""

    def log_graph(self, model: torch.nn.Module, input_array: Any = None) -> None:  # noqa: B027
        """Record the model's computational graph; loggers that cannot do so ignore it."""

    def save(self) -> None:  # noqa: B027
        """Write whatever the logger still holds in memory."""

    def finalize(self, status: str) -> None:
        """Write everything and release files at the end of a run.

        Args:
            status: How the run ended: ``"success"``, ``"failed"`` or ``"interrupted"``.
        """
        self.save()


class _NoOpExperiment:
    """Stands in for a writer on ranks that do not write: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _NoOpExperiment:
        return self

    def __getitem__(self, key: Any) -> _NoOpExperiment:
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _FileLogger(Logger):
    """A logger writing under ``root_dir/name/version`` on global rank 0, with a tensor buffer."""

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        name: str | None,
        version: int | str | None,
        prefix: str,
        flush_logs_every_n_steps: int,
    ) -> None:
        cls = type(self).__name__
        if isinstance(version, bool) or not isinstance(version, (int, str, type(None))):
            raise TypeError(
                f"{cls}(version={version!r}) must be an int (for version_N), a string (used as the"
                " directory name) or None (the next free version)."
            )
        if isinstance(version, int) and version < 0:
            raise ValueError(f"{cls}(version={version}) must be >= 0, or None for the next free version.")
        if isinstance(flush_logs_every_n_steps, bool) or not isinstance(flush_logs_every_n_steps, int):
            raise TypeError(f"{cls}(flush_logs_every_n_steps={flush_logs_every_n_steps!r}) must be an int.")
        if flush_logs_every_n_steps < 1:
            raise ValueError(
                f"{cls}(flush_logs_every_n_steps={flush_logs_every_n_steps}) must be at least 1"
                " (1 writes every row at once)."
            )
        self._root_dir = os.fspath(root_dir)
        # Where files go; the properties report the path as written, as Lightning's do.
        self._base_dir = os.path.expandvars(os.path.expanduser(self._root_dir))
        self._name = name or ""
        self._version = version
        self._given_version = version
        self._prefix = prefix
        self._flush_every = flush_logs_every_n_steps
        self._global_rank: int | None = None
        self._rows: list[tuple[Any, dict[str, Any]]] = []
        self._num_rows = 0
        self._last_flush = time.monotonic()

    # --- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The experiment's name: a directory level under ``root_dir`` (none when empty)."""
        return self._name

    @property
    def version(self) -> int | str:
        """This run's version. Decided on first use: the next free ``version_N`` unless one was given."""
        if self._version is None:
            self._version = self._next_version()
        return self._version

    @property
    def root_dir(self) -> str:
        """The ``root_dir`` argument exactly as given (``~`` is not expanded here, as in Lightning)."""
        return self._root_dir

    @property
    def log_dir(self) -> str:
        """``root_dir/name/version_N`` (or the version string itself as the last level), as given."""
        return self._version_dir(self._root_dir)

    @property
    def _output_dir(self) -> str:
        """The directory files are written to: :attr:`log_dir` with ``~`` and variables expanded."""
        return self._version_dir(self._base_dir)

    def _version_dir(self, base: str) -> str:
        version = self.version
        return os.path.join(base, self._name, version if isinstance(version, str) else f"version_{version}")

    @property
    def _rank(self) -> int:
        if self._global_rank is not None:
            return self._global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def _next_version(self) -> int:
        parent = os.path.join(self._base_dir, self._name)
        existing = [-1]
        if os.path.isdir(parent):
            for entry in os.listdir(parent):
                match = _VERSION_DIR.fullmatch(entry)
                if match and os.path.isdir(os.path.join(parent, entry)):
                    existing.append(int(match.group(1)))
        candidate = max(existing) + 1
        if self._rank != 0:
            return candidate
        while True:
            try:
                # Creating the directory reserves the version: another job's mkdir of it fails.
                os.makedirs(os.path.join(parent, f"version_{candidate}"), exist_ok=False)
            except FileExistsError:
                candidate += 1
                continue
            return candidate

    # --- logging --------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Buffer one row of metrics (rank 0 only); it is written at the next flush.

        Args:
            metrics: Metric names and numbers or single-element tensors; nested mappings are
                flattened with ``/`` between the keys.
            step: The training step; ``None`` numbers the rows 0, 1, 2, ...

        Raises:
            TypeError: A value is neither a number nor a tensor.
            ValueError: A tensor holds more than one element.
        """
        if self._rank != 0:
            return
        row: dict[str, Any] = {}
        for key, value in _flatten(metrics, self.group_separator).items():
            full_key = f"{self._prefix}-{key}" if self._prefix else key
            row[full_key] = _buffered_value(type(self).__name__, key, value)
        self._rows.append((self._buffered_step(step), row))
        self._num_rows += 1
        hold_until_exit(self)
        if len(self._rows) >= self._flush_every or time.monotonic() - self._last_flush >= _FLUSH_SECONDS:
            self.save()

    def _buffered_step(self, step: Any) -> Any:
        if step is None:
            return self._num_rows
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            return step.detach().reshape(()).clone()
        if isinstance(step, numbers.Real) and not isinstance(step, bool):
            return step
        raise TypeError(
            f"{type(self).__name__}.log_metrics(step={step!r}) needs an int (or a one-element tensor)."
            " Pass the training step, or None to number the rows."
        )

    def save(self) -> None:
        """Write the buffered rows (rank 0 only): one device sync for all tensors in them."""
        self._last_flush = time.monotonic()
        if self._rank != 0 or not self._rows:
            return
        rows, self._rows = self._rows, []
        steps_and_values = _to_python([(step, row) for step, row in rows])
        self._write_rows([(int(step), row) for step, row in steps_and_values])

    def finalize(self, status: str) -> None:
        """Write every buffered row and release open files; logging again later reopens them.

        Args:
            status: How the run ended (``"success"``, ``"failed"``, ...); recorded nowhere.
        """
        self.save()
        self._close()
        release(self)

    @abstractmethod
    def _write_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Write rows of plain Python numbers (called on rank 0 only)."""

    def _close(self) -> None:
        """Release open files (called on rank 0 and elsewhere; must tolerate nothing being open)."""

    def __getstate__(self) -> dict[str, Any]:
        # Rows belong to the process that logged them: a copy sent to a new process must not write
        # them a second time.
        state = self.__dict__.copy()
        state["_rows"] = []
        return state


def _params_as_dict(logger: str, params: Any) -> dict[str, Any]:
    """Hyperparameters as a dict: a mapping, an ``argparse.Namespace`` (or similar object), or None.

    Raises:
        TypeError: Anything else.
    """
    if isinstance(params, Mapping):
        return dict(params)
    if params is None:
        return {}
    if hasattr(params, "__dict__") and not isinstance(params, type):
        return dict(vars(params))
    raise TypeError(
        f"{logger}.log_hyperparams got {type(params).__name__}; it takes a mapping or an"
        " argparse.Namespace. Pass dict(name=value, ...)."
    )


def _flatten(metrics: Mapping[str, Any], separator: str, parent: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{parent}{separator}{key}" if parent else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, separator, name))
        else:
            flat[name] = value
    return flat


def _buffered_value(logger: str, key: str, value: Any) -> Any:
    """Check one metric value and return what the buffer keeps (a detached copy of a tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{logger}.log_metrics got a tensor of shape {tuple(value.shape)} for {key!r}; a metric is"
                f" one number. Log a reduction such as {key}.mean(), or one key per element."
            )
        # A copy, because callers often keep updating the tensor in place (running sums).
        return value.detach().reshape(()).clone()
    if isinstance(value, numbers.Number):
        return value
    raise TypeError(
        f"{logger}.log_metrics got {type(value).__name__} for {key!r}; it records numbers and"
        " single-element tensors. Log a number, or record other objects with the writer itself"
        " (logger.experiment)."
    )


def _to_python(rows: list[tuple[Any, dict[str, Any]]]) -> list[tuple[Any, dict[str, Any]]]:
    """Replace every tensor in ``rows`` by a Python number, one ``tolist()`` per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, str | None, torch.Tensor]]] = {}
    for index, (step, row) in enumerate(rows):
        if isinstance(step, torch.Tensor):
            groups.setdefault((step.device, step.dtype), []).append((index, None, step))
        for key, value in row.items():
            if isinstance(value, torch.Tensor):
                groups.setdefault((value.device, value.dtype), []).append((index, key, value))
    if not groups:
        return rows
    out = [(step, dict(row)) for step, row in rows]
    for members in groups.values():
        numbers_ = torch.stack([tensor for _, _, tensor in members]).tolist()
        for (index, member_key, _), number in zip(members, numbers_, strict=True):
            if member_key is None:
                out[index] = (number, out[index][1])
            else:
                out[index][1][member_key] = number
    return out


# Loggers to finalise at interpreter exit. Strong references, because a logger that goes out of
# scope with rows in its buffer must still write them. Ours are held only while they hold rows or
# open files; loggers of other libraries from the moment a Fabric receives them.
_held: dict[int, Any] = {}
_exit_hook_registered = False


def hold_until_exit(logger: Any) -> None:
    """Finalise ``logger`` at interpreter exit unless it is released first (hook registered once)."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_finalize_at_exit)
        _exit_hook_registered = True
    _held[id(logger)] = logger


def release(logger: Any) -> None:
    """Stop holding ``logger`` for the exit hook (it has nothing left to write)."""
    _held.pop(id(logger), None)


def finalize_all(loggers: list[Any], status: str) -> None:
    """Call ``finalize(status)`` on each logger that has it; a failing one warns, the rest still run."""
    for logger in loggers:
        finalize = getattr(logger, "finalize", None)
        if not callable(finalize):
            continue
        try:
            finalize(status)
        except Exception as exc:
            warnings.warn(
                f"{type(logger).__name__}.finalize({status!r}) raised {type(exc).__name__}: {exc}."
                " Its last rows may not have been written.",
                RuntimeWarning,
                stacklevel=2,
            )


def _finalize_at_exit() -> None:
    # The interpreter sets sys.last_exc (3.12+) or sys.last_value when an exception ended the script.
    failed = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    loggers = list(_held.values())
    _held.clear()
    finalize_all(loggers, "failed" if failed is not None else "success")
