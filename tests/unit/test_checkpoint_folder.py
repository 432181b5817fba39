"""CheckpointFolder: names by step, the newest complete checkpoint, keeping the last K, leftovers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from handloom import Fabric
from handloom.checkpoint import CheckpointFolder, latest_checkpoint
from handloom.checkpoint import staging as staging_dirs


def _file(path: Path, step: int) -> Path:
    torch.save({"step": step}, path)
    return path


def _sharded(path: Path, step: int, complete: bool = True) -> Path:
    """A stand-in for a sharded checkpoint directory (the folder only looks at the marker)."""
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (path / staging_dirs.MARKER).write_text(json.dumps({"step": step}))
    return path


def _names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_paths_are_zero_padded_and_listed_by_step(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path)
    assert folder.path(42) == tmp_path / "step-000000042.ckpt"
    assert folder.checkpoints() == [] and folder.latest() is None
    for step in (100, 2, 10):
        _file(folder.path(step), step)
    _file(tmp_path / "step-7.ckpt", 7)  # written by hand, not padded: still step 7
    _file(tmp_path / "step-1000000000.ckpt", 1_000_000_000)  # more digits than the padding
    _sharded(folder.path(50), 50)
    for other in ("other.ckpt", "step-x.ckpt", "step-3.pt", "prefix-step-4.ckpt"):
        _file(tmp_path / other, 0)
    expected = ["step-000000002.ckpt", "step-7.ckpt", "step-000000010.ckpt", "step-000000050.ckpt"]
    expected += ["step-000000100.ckpt", "step-1000000000.ckpt"]
    assert _names(folder.checkpoints()) == expected
    assert folder.latest() == tmp_path / "step-1000000000.ckpt"
    assert latest_checkpoint(tmp_path) == folder.latest()


def test_a_missing_root_has_no_checkpoints(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path / "not-yet", keep_last=2)
    assert folder.checkpoints() == [] and folder.latest() is None and folder.prune() == []
    assert latest_checkpoint(tmp_path / "not-yet") is None


def test_custom_prefix_and_suffix(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path, prefix="epoch=", suffix="")
    _sharded(folder.path(3), 3)
    _file(tmp_path / "step-000000009.ckpt", 9)  # another naming: not this folder's
    assert folder.latest() == tmp_path / "epoch=000000003"
    assert latest_checkpoint(tmp_path, prefix="epoch=", suffix="") == folder.latest()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000000009.ckpt"


def test_latest_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path)
    good = _file(folder.path(1), 1)
    _sharded(folder.path(2), 2)
    truncated = folder.path(3)
    truncated.write_bytes(good.read_bytes()[:-30])  # copied by hand and cut short
    (folder.path(4)).write_bytes(b"")
    _sharded(folder.path(5), 5, complete=False)  # a directory without the marker
    folder.path(6).mkdir()  # an empty directory
    assert _names(folder.checkpoints()) == [folder.path(1).name, folder.path(2).name]
    assert folder.latest() == folder.path(2)


def test_prune_keeps_the_newest_and_removes_leftovers(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path, keep_last=2)
    for step in range(1, 6):
        (_file if step % 2 else _sharded)(folder.path(step), step)
    leftovers = [
        tmp_path / f".{folder.path(6).name}.3f9a1c2b.tmp",  # a file save that was killed
        _sharded(tmp_path / f".{folder.path(7).name}.staging", 7, complete=False),  # a killed sharded save
        _sharded(tmp_path / f".{folder.path(5).name}.old", 4),  # killed before deleting the replaced one
    ]
    leftovers[0].write_bytes(b"PK partial")
    truncated = folder.path(8)
    truncated.write_bytes(b"PK\x03\x04 not finished")
    foreign = [tmp_path / ".other.ckpt.abc.tmp", tmp_path / "notes.txt", tmp_path / ".step-9.pt.old"]
    for path in foreign:
        path.write_text("not ours")
    removed = folder.prune()
    assert sorted(removed) == sorted([folder.path(1), folder.path(2), folder.path(3), *leftovers])
    assert not any(path.exists() for path in removed)
    assert _names(folder.checkpoints()) == [folder.path(4).name, folder.path(5).name]
    # A visible file that is not a complete checkpoint is the user's to judge, and names that are
    # not this folder's are never touched.
    assert truncated.exists() and all(path.exists() for path in foreign)
    assert folder.prune() == []


def test_keep_last_none_keeps_every_checkpoint(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path, keep_last=None)
    for step in range(4):
        _file(folder.path(step), step)
    (tmp_path / f".{folder.path(9).name}.x1.tmp").write_bytes(b"")
    assert folder.prune() == [tmp_path / f".{folder.path(9).name}.x1.tmp"]
    assert len(folder.checkpoints()) == 4


@pytest.mark.parametrize("staging_complete", [True, False])
def test_a_commit_interrupted_between_its_renames_is_listed_and_finished_not_deleted(
    tmp_path: Path, staging_complete: bool
) -> None:
    folder = CheckpointFolder(tmp_path, keep_last=1)
    _file(folder.path(1), 1)
    target = folder.path(2)
    # The crash came after "target -> .old" and before ".staging -> target".
    _sharded(staging_dirs.old_path(target), 1)
    _sharded(staging_dirs.staging_path(target), 2, complete=staging_complete)
    assert folder.latest() == target  # fabric.load(target) reads it (staging.readable)
    assert staging_dirs.readable(target).is_dir()
    removed = folder.prune()
    superseded = staging_dirs.old_path(target) if staging_complete else staging_dirs.staging_path(target)
    assert removed == [folder.path(1), superseded]
    assert staging_dirs.is_complete(target)
    kept = staging_dirs.read_marker(target)["step"]
    assert kept == (2 if staging_complete else 1)  # the new copy when complete, else the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_the_documented_loop(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    folder = CheckpointFolder(tmp_path / "ckpts", keep_last=2)
    assert folder.latest() is None
    weight = torch.zeros(3)
    for step in range(1, 5):
        weight += 1
        fabric.save(folder.path(step), {"weight": weight, "step": step})
        folder.prune()
    assert _names(folder.checkpoints()) == [folder.path(3).name, folder.path(4).name]
    state: dict[str, Any] = {"weight": None, "step": 0}
    fabric.load(folder.latest(), state)  # type: ignore[arg-type]
    assert state["step"] == 4 and torch.equal(state["weight"], torch.full((3,), 4.0))


@pytest.mark.parametrize("keep_last", [0, -1, True, 2.5, "3"])
def test_keep_last_must_be_a_positive_int(tmp_path: Path, keep_last: Any) -> None:
    with pytest.raises(ValueError, match=rf"keep_last={keep_last!r}.*int >= 1.*None"):
        CheckpointFolder(tmp_path, keep_last=keep_last)


@pytest.mark.parametrize("prefix", ["", "a/b", ".hidden", None])
def test_prefix_must_be_a_plain_name_start(tmp_path: Path, prefix: Any) -> None:
    with pytest.raises(ValueError, match=rf"prefix={prefix!r}"):
        CheckpointFolder(tmp_path, prefix=prefix)


@pytest.mark.parametrize("suffix", ["/model.ckpt", None])
def test_suffix_must_be_a_plain_name_end(tmp_path: Path, suffix: Any) -> None:
    with pytest.raises(ValueError, match=rf"suffix={suffix!r}"):
        CheckpointFolder(tmp_path, suffix=suffix)


@pytest.mark.parametrize("step", [-1, True, 1.5, "3"])
def test_step_must_be_a_non_negative_int(tmp_path: Path, step: Any) -> None:
    with pytest.raises(ValueError, match=rf"step={step!r}.*int >= 0"):
        CheckpointFolder(tmp_path).path(step)
