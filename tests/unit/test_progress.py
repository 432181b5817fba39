"""The progress bar: drawn on rank 0 in a terminal (or when forced), absent and free otherwise."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from handloom.utilities import progress as progress_module
from handloom.utilities import progress_bar


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_no_bar_when_output_is_not_a_terminal() -> None:
    out = io.StringIO()
    items = [1, 2, 3]
    bar = progress_bar(items, desc="train", file=out)
    assert not bar.enabled
    assert type(iter(bar)) is type(iter(items))  # the plain iterator: nothing per item
    bar.set_postfix(loss=torch.tensor(0.5))
    bar.set_description("other")
    bar.close()
    assert list(bar) == items and len(bar) == 3
    assert out.getvalue() == ""


def test_bar_in_a_terminal_with_postfix() -> None:
    out = Terminal()
    bar = progress_bar(range(3), desc="epoch 0", file=out)
    assert bar.enabled
    seen = []
    for item in bar:
        seen.append(item)
        bar.set_postfix(loss=torch.tensor(0.25))
    assert seen == [0, 1, 2]
    text = out.getvalue()
    assert "epoch 0" in text and "3/3" in text and "loss=0.25" in text


def test_default_stream_is_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress_bar([1, 2], desc="on stderr")) == [1, 2]
    assert "on stderr" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected to a file, as in a cluster job
    assert not progress_bar([1, 2]).enabled


def test_enabled_forces_or_suppresses_the_bar() -> None:
    log = io.StringIO()
    with progress_bar(iter([1, 2]), total=2, desc="forced", enabled=True, file=log) as bar:
        assert list(bar) == [1, 2]
    assert "forced" in log.getvalue() and "2/2" in log.getvalue()

    terminal = Terminal()
    assert not progress_bar([1], enabled=False, file=terminal).enabled
    assert terminal.getvalue() == ""


def test_only_global_rank_zero_draws() -> None:
    terminal = Terminal()
    rank_one = SimpleNamespace(global_rank=1)
    bar = progress_bar([1, 2], rank_one, enabled=True, file=terminal)  # type: ignore[arg-type]
    assert not bar.enabled and list(bar) == [1, 2]
    assert terminal.getvalue() == ""
    rank_zero = SimpleNamespace(global_rank=0)
    assert progress_bar([1], rank_zero, file=terminal).enabled  # type: ignore[arg-type]


def test_without_tqdm_the_loop_runs_and_a_forced_bar_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    monkeypatch.setattr(progress_module, "_warned_missing_tqdm", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress_bar([1, 2], file=Terminal())  # not asked for explicitly: no complaint
    assert not bar.enabled and list(bar) == [1, 2]

    with pytest.warns(UserWarning, match=r'progress_bar\(enabled=True\) needs tqdm.*"handloom\[progress\]"'):
        bar = progress_bar([1, 2], enabled=True)
    assert not bar.enabled and list(bar) == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        progress_bar([3], enabled=True)  # said once is enough


def test_utilities_import_without_tqdm() -> None:
    # torch itself imports tqdm when it is installed, so block it as if the extra were missing.
    code = "import sys; sys.modules['tqdm'] = None; import handloom.utilities"
    subprocess.run([sys.executable, "-c", code], check=True)
