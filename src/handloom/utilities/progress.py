"""A tqdm progress bar for training loops: on global rank 0, in a terminal, and free everywhere else.

tqdm is an optional dependency (``pip install "handloom[progress]"``), imported only when a bar is
actually drawn.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

if TYPE_CHECKING:
    from handloom.fabric import Fabric

__all__ = ["ProgressBar", "progress_bar"]

T = TypeVar("T")

_warned_missing_tqdm = False


class ProgressBar(Generic[T]):
    """What :func:`progress_bar` returns: iterate over it as over the wrapped iterable.

    When the bar is disabled, iterating hands out the wrapped iterable's own iterator, so the loop
    pays nothing per item, and the other methods do nothing. A bar covers one pass: make a new one
    per epoch.
    """

    def __init__(self, iterable: Iterable[T], bar: Any = None) -> None:
        self._iterable = iterable
        self._bar = bar

    @property
    def enabled(self) -> bool:
        """True when a bar is drawn."""
        return self._bar is not None

    def __iter__(self) -> Iterator[T]:
        return iter(self._bar if self._bar is not None else self._iterable)

    def __len__(self) -> int:
        return len(self._iterable)  # type: ignore[arg-type]  # a TypeError for unsized iterables, as len() gives

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` after the bar, e.g. ``bar.set_postfix(loss=loss)``.

        One-element tensors are converted with ``.item()`` only when a bar is drawn, so on other
        ranks (and without a terminal) passing a CUDA tensor costs no device synchronisation.
        """
        if self._bar is None:
            return
        plain = {
            key: value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            for key, value in values.items()
        }
        self._bar.set_postfix(plain)

    def set_description(self, desc: str) -> None:
        """Replace the text before the bar (e.g. ``f"epoch {epoch}"``)."""
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        """Finish the bar (tqdm also does this when the iteration ends)."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[T],
    fabric: Fabric | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool | None = None,
    **tqdm_kwargs: Any,
) -> ProgressBar[T]:
    """Wrap ``iterable`` in a tqdm progress bar on global rank 0 when it writes to a terminal.

    Other ranks, and rank 0 when its output is redirected to a file or pipe (a cluster job's log),
    get the plain iterable back inside a :class:`ProgressBar` whose methods do nothing, so the same
    loop runs everywhere. Without tqdm installed the loop also runs without a bar.

    Args:
        iterable: What the loop iterates over, e.g. a dataloader from ``fabric.setup_dataloaders``.
        fabric: Gives the global rank. Without it the rank of an initialised
            ``torch.distributed`` process group is used, else 0.
        total: Number of items, for iterables without ``len()``.
        desc: Text before the bar.
        enabled: ``True`` draws the bar even when the output is not a terminal (e.g. to follow
            a job's log), ``False`` never draws it; ``None`` (default) draws it in a terminal.
            Ranks other than 0 never draw one.
        tqdm_kwargs: Passed to ``tqdm.tqdm`` (``leave``, ``unit``, ``file``, ``position``, ...).

    Returns:
        An iterable over the same items, with ``set_postfix`` and ``set_description``.

    Example::

        for epoch in range(epochs):
            bar = progress_bar(loader, fabric, desc=f"epoch {epoch}")
            for x, y in bar:
                loss = train_step(x, y)
                bar.set_postfix(loss=loss)
    """
    if not _should_draw(fabric, enabled, tqdm_kwargs.get("file")):
        return ProgressBar(iterable)
    try:
        tqdm = importlib.import_module("tqdm")  # untyped, and optional: resolved only here
    except ImportError:
        _warn_missing_tqdm(enabled)
        return ProgressBar(iterable)
    return ProgressBar(iterable, tqdm.tqdm(iterable, total=total, desc=desc, **tqdm_kwargs))


def _global_rank(fabric: Fabric | None) -> int:
    if fabric is not None:
        return fabric.global_rank
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _should_draw(fabric: Fabric | None, enabled: bool | None, file: Any) -> bool:
    if enabled is False or _global_rank(fabric) != 0:
        return False
    if enabled:
        return True
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def _warn_missing_tqdm(enabled: bool | None) -> None:
    global _warned_missing_tqdm
    if not enabled or _warned_missing_tqdm:
        return  # in a terminal by default: a missing optional extra is no reason to complain
    _warned_missing_tqdm = True
    warnings.warn(
        "progress_bar(enabled=True) needs tqdm, which is not installed, so the loop runs without a bar."
        ' Install it with: pip install "handloom[progress]"',
        stacklevel=3,
    )
