"""One-file checkpoints: atomic writes, named errors for damaged files, safe loading, async saves.

Everything here runs in one process (single-device Fabric), except the exit-status checks, which
run a short script in a subprocess.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric
from handloom.checkpoint import CheckpointFolder, CheckpointSaveError, background, read_checkpoint

REPO = Path(__file__).resolve().parents[2]


class Opaque:
    """A class torch.load(weights_only=True) does not know."""

    def __init__(self, value: int) -> None:
        self.value = value


@pytest.fixture
def fabric() -> Iterator[Fabric]:
    yield Fabric(accelerator="cpu", devices=1)
    background.wait()  # never leave a background save (a non-daemon thread) to the next test


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _saved(fabric: Fabric, path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = fabric.setup_module(_model())
    fabric.save(path, {"model": model, "step": 7})
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _assert_state(data: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    assert data["model"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(data["model"][key], value), key


# --- writing --------------------------------------------------------------------------------------


def test_save_writes_a_plain_torch_file_with_the_usual_permissions(fabric: Fabric, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "model.ckpt"
    _, expected = _saved(fabric, path)
    _assert_state(torch.load(path, weights_only=True), expected)
    assert _hidden(path.parent) == []  # the temporary file was renamed, not left behind
    # A checkpoint must be readable by whoever may read a file this process creates (umask), not
    # by its owner only, which is what a tempfile.mkstemp-created file would carry over.
    (tmp_path / "plain").write_bytes(b"")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(
    fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.ckpt"
    model, expected = _saved(fabric, path)
    real_save = torch.save

    def half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # half the file is on disk when the "disk fills up"
            handle.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        fabric.save(path, {"model": model, "step": 8})
    monkeypatch.undo()
    _assert_state(fabric.load(path), expected)
    assert _hidden(tmp_path) == []


def test_saving_a_file_over_a_directory_is_refused(fabric: Fabric, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"ckpt.*directory"):
        fabric.save(tmp_path / "ckpt", {"step": 1})


# --- damaged files ----------------------------------------------------------------------------------


def _damage(good: bytes, how: str) -> bytes:
    if how == "truncated":
        return good[: len(good) * 2 // 3]
    if how == "empty":
        return b""
    if how == "html":  # a download that saved the server's error page
        return b"<html><body>404 Not Found</body></html>\n"
    return bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).tolist())


@pytest.mark.parametrize(
    ("how", "what"),
    [
        ("truncated", "not a torch.save archive"),
        ("empty", "it is empty"),
        ("html", "not a torch.save archive"),
        ("random", "not a torch.save archive"),
    ],
)
@pytest.mark.parametrize("mmap", [False, True])
def test_damaged_file_is_a_named_error(
    fabric: Fabric, tmp_path: Path, how: str, what: str, mmap: bool
) -> None:
    good = tmp_path / "good.ckpt"
    model, _ = _saved(fabric, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(_damage(good.read_bytes(), how))
    # Bytes that are no checkpoint also fail the safe unpickler; that must read as damage, not as
    # "pass weights_only=False", which would not help and would run the bytes through pickle.
    with pytest.raises(RuntimeError, match=rf"bad\.ckpt.*{what}.*truncated or corrupted") as info:
        read_checkpoint(bad, mmap=mmap)
    assert "weights_only=False" not in str(info.value)
    with pytest.raises(RuntimeError, match=r"bad\.ckpt"):
        fabric.load(bad, {"model": model})
    with pytest.raises(RuntimeError, match=r"bad\.ckpt"):
        fabric.load_raw(bad, model)


def test_a_file_that_is_not_a_dict_is_a_named_error(fabric: Fabric, tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(RuntimeError, match=r"list\.pt.*holds a list, not a dict"):
        fabric.load(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_objects_need_an_explicit_opt_in(fabric: Fabric, tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "opaque.ckpt"
    torch.save({"thing": Opaque(5), "w": torch.ones(2)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError) as info:
        fabric.load(path)
    message = str(info.value)
    assert "opaque.ckpt" in message and f"{__name__}.Opaque" in message
    assert "torch.serialization.add_safe_globals" in message and "weights_only=False" in message
    assert "\x1b[" not in message  # torch's terminal colour codes are stripped
    assert fabric.load(path, weights_only=False)["thing"].value == 5
    with torch.serialization.safe_globals([Opaque]):
        assert fabric.load(path)["thing"].value == 5


def test_legacy_format_files_still_load(fabric: Fabric, tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(fabric.load(path)["w"], torch.arange(3.0))


def test_a_path_with_only_an_interrupted_save_says_so(fabric: Fabric, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt.*Check the path"):
        fabric.load(tmp_path / "missing.ckpt")
    (tmp_path / ".model.ckpt.k2j4h1.tmp").write_bytes(b"PK\x03\x04 partial")
    with pytest.raises(FileNotFoundError, match=r"only '\.model\.ckpt\.k2j4h1\.tmp'.*interrupted"):
        fabric.load(tmp_path / "model.ckpt")
    (tmp_path / ".shards.staging").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.shards\.staging.*interrupted"):
        fabric.load(tmp_path / "shards")


# --- async saves --------------------------------------------------------------------------------------


def test_async_save_writes_a_host_copy_taken_when_save_returns(
    fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fabric.setup_module(_model())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    fabric.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    counter = torch.zeros(1)
    gate = threading.Event()
    real_save = torch.save

    def gated(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        assert gate.wait(30)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", gated)
    path = tmp_path / "async.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "counter": counter}, async_save=True)
    assert not path.exists() and background.in_flight() == str(path)  # save returned before writing
    with torch.no_grad():  # training goes on and changes everything in place
        for param in model.parameters():
            param.add_(100.0)
        for state in optimizer.state.values():
            state["momentum_buffer"].add_(100.0)
        counter.add_(1)
    gate.set()
    data = fabric.load(path)  # waits for the write
    _assert_state(data, expected)
    assert data["counter"].item() == 0
    for saved, value in zip(data["optimizer"]["state"].values(), momentum, strict=True):
        assert torch.equal(saved["momentum_buffer"], value)


def test_async_save_keeps_tied_weights_tied(fabric: Fabric, tmp_path: Path) -> None:
    shared = torch.arange(6.0).reshape(2, 3)
    fabric.save(tmp_path / "tied.ckpt", {"a": shared, "b": shared, "view": shared[1]}, async_save=True)
    data = fabric.load(tmp_path / "tied.ckpt")
    assert data["a"].untyped_storage().data_ptr() == data["b"].untyped_storage().data_ptr()
    assert torch.equal(data["view"], shared[1])


@pytest.mark.parametrize("raised_by", ["save", "load"])
def test_a_failed_async_save_is_raised_by_the_next_call(
    fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised_by: str
) -> None:
    path = tmp_path / "model.ckpt"
    model, expected = _saved(fabric, path)
    real_save = torch.save

    def fail_for_path(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        if Path(f).name.startswith(f".{path.name}."):  # writes of this checkpoint fail
            raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(torch, "save", fail_for_path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    fabric.save(path, {"model": model, "step": 8}, async_save=True)  # returns; the write fails later
    with pytest.raises(CheckpointSaveError, match="Disk quota exceeded") as info:
        if raised_by == "save":
            fabric.save(tmp_path / "other.ckpt", {"model": model})
        else:
            fabric.load(tmp_path / "other.ckpt")
    assert str(path) in str(info.value) and "earlier checkpoint at that path is intact" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert not (tmp_path / "other.ckpt").exists()  # the call that raised did nothing else
    _assert_state(fabric.load(path), expected)
    assert _hidden(tmp_path) == []
    fabric.save(tmp_path / "other.ckpt", {"model": model})  # the error was raised once, not stuck


def test_prune_leaves_the_files_of_a_save_in_flight(
    fabric: Fabric, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = CheckpointFolder(tmp_path, keep_last=1)
    for step in (1, 2):
        fabric.save(folder.path(step), {"step": step})
    gate = threading.Event()
    real_save = torch.save

    def gated(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)  # the temporary file is complete on disk, not renamed yet
        assert gate.wait(30)

    monkeypatch.setattr(torch, "save", gated)
    fabric.save(folder.path(3), {"step": 3}, async_save=True)
    (tmp_path / f".{folder.path(3).name}.stale.tmp").write_bytes(b"")  # another leftover of step 3
    assert folder.prune() == [folder.path(1)]  # the in-flight save's files are neither counted nor removed
    gate.set()
    background.wait()
    assert [p.name for p in folder.checkpoints()] == [folder.path(2).name, folder.path(3).name]
    assert folder.prune() == [folder.path(2), tmp_path / f".{folder.path(3).name}.stale.tmp"]
    assert fabric.load(folder.latest())["step"] == 3  # type: ignore[arg-type]


_SCRIPT = """
import sys
import torch
from handloom import Fabric

fabric = Fabric(accelerator="cpu", devices=1)
fabric.save(sys.argv[1], {"w": torch.ones(3)}, async_save=True)
print("training finished", flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fails", [False, True])
def test_the_last_async_save_decides_the_exit_status(tmp_path: Path, fails: bool) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    path = tmp_path / "a-file" / "last.ckpt" if fails else tmp_path / "last.ckpt"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=REPO,
    )
    assert "training finished" in done.stdout
    if fails:
        assert done.returncode == 1, done.stderr
        assert f"handloom: The background save of {str(path)!r} failed" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_the_public_helpers_are_the_documented_callables() -> None:
    import importlib

    import handloom.checkpoint as package

    importlib.import_module("handloom.checkpoint.consolidate")  # what `handloom consolidate` imports
    from handloom.checkpoint import CheckpointFolder as Folder
    from handloom.checkpoint import consolidate, latest_checkpoint

    assert callable(consolidate) and consolidate.__name__ == "consolidate"
    assert package.consolidate is consolidate  # not the module of the same name
    assert Folder is CheckpointFolder and latest_checkpoint.__name__ == "latest_checkpoint"
