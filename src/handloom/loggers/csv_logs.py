"""``CSVLogger``: metrics as rows of ``metrics.csv``, hyperparameters in ``hparams.json``."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from typing_extensions import override

from handloom.loggers.base import _FileLogger, _NoOpExperiment, _params_as_dict

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.json"


class CSVLogger(_FileLogger):
    """Log metrics to ``root_dir/name/version_N/metrics.csv`` on global rank 0.

    Compared with Lightning's ``CSVLogger``: rows buffered in memory are written at interpreter
    exit (and when a Fabric job's worker ends), so none is lost when ``finalize`` is never called;
    ``log_hyperparams`` works; a flush happens every ``flush_logs_every_n_steps`` rows whatever the
    step numbers are; and an existing ``metrics.csv`` is never deleted.

    Files, under :attr:`log_dir`:

    * ``metrics.csv``: a ``step`` column, then one column per metric in order of first appearance.
      The ``step`` column holds the ``step`` argument; a metric named ``step`` does not replace it.
      A row holds one ``log_metrics`` call; metrics it did not log are empty. When a new metric
      appears, the file is rewritten with the wider header and every earlier row kept.
    * ``hparams.json``: the hyperparameters (JSON, whatever is installed, so the file name never
      depends on the environment; JSON is also valid YAML for YAML readers). Repeated calls merge.

    Args:
        root_dir: The directory for all experiments. Files go where ``~`` and environment
            variables in it point; :attr:`root_dir` and :attr:`log_dir` show it as written.
        name: The experiment's directory under ``root_dir``; ``""`` or ``None`` for none.
        version: An int (directory ``version_N``), a string (the directory's name), or ``None`` for
            the next free ``version_N``. Naming a version whose ``metrics.csv`` exists continues that
            file (a warning says how many rows it holds).
        prefix: Put in front of every metric name, joined with ``-``.
        flush_logs_every_n_steps: Write the buffered rows every this many rows (and after 30 s).

    Raises:
        TypeError: ``version`` or ``flush_logs_every_n_steps`` has the wrong type.
        ValueError: A negative ``version`` or a ``flush_logs_every_n_steps`` below 1.

    Example::

        logger = CSVLogger("logs", name="mnist")
        fabric = Fabric(loggers=logger)
        fabric.log_dict({"loss": loss, "lr": lr}, step=step)   # tensors stay on the device until a flush
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(root_dir, name, version, prefix, flush_logs_every_n_steps)
        self._file: _CSVFile | None = None

    @property  # type: ignore[misc]  # read-only here; the base lets Lightning-style loggers assign it
    @override
    def experiment(self) -> Any:
        """The metrics file writer on rank 0 (``metrics_file_path``, ``log_metrics``, ``save``); a no-op
        object on other ranks."""
        if self._rank != 0:
            return _NoOpExperiment()
        if self._file is None:
            self._file = _CSVFile(self._output_dir, explicit_version=self._given_version is not None)
        return self._file

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Merge ``params`` into ``hparams.json`` in :attr:`log_dir` (rank 0 only).

        Args:
            params: A mapping or an ``argparse.Namespace``; values JSON cannot hold are written as
                their ``str()``.

        Raises:
            TypeError: ``params`` is neither a mapping nor a namespace.
        """
        if self._rank != 0:
            return
        values = _params_as_dict("CSVLogger", params)
        path = os.path.join(self._output_dir, HPARAMS_FILE)
        os.makedirs(self._output_dir, exist_ok=True)
        merged: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                merged = json.load(handle)
        merged.update(values)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(merged, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, path)

    @override
    def _write_rows(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        self.experiment.write(rows)


class _CSVFile:
    """The ``metrics.csv`` of one version directory: appends rows, widens the header when needed."""

    def __init__(self, log_dir: str, explicit_version: bool) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        if explicit_version and os.path.isfile(self.metrics_file_path):
            _, old_rows = _read(self.metrics_file_path)
            if old_rows:
                warnings.warn(
                    f"CSVLogger: {self.metrics_file_path} already holds {len(old_rows)} rows; new rows are"
                    " appended after them. Pass version=None to start a new version directory instead.",
                    UserWarning,
                    stacklevel=4,
                )

    def write(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Append ``rows``; rewrite the file with a wider header if they bring new metric names."""
        # The header is read from disk, not remembered: another process (the parent of forked
        # workers, a resumed run) may have widened it.
        header, _ = _read(self.metrics_file_path, header_only=True)
        columns = header or ["step"]
        new = [key for _, row in rows for key in row if key not in columns]
        new = list(dict.fromkeys(new))
        # The step argument wins over a metric named "step", as in Lightning.
        records = [{**row, "step": step} for step, row in rows]
        if header and not new:
            with open(self.metrics_file_path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=columns).writerows(records)
            return
        _, old_rows = _read(self.metrics_file_path) if header else ([], [])
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns + new)
            writer.writeheader()
            writer.writerows(old_rows)
            writer.writerows(records)
        os.replace(tmp, self.metrics_file_path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write one row at once (bypassing the logger's buffer)."""
        self.write([(step, dict(metrics))])

    def save(self) -> None:
        """Nothing to do: every write goes to disk at once."""


def _read(path: str, header_only: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        return header, [] if header_only else list(reader)
