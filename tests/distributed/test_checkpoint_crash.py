"""Checkpoints under failure and across processes.

* A save killed with SIGKILL (one file; two FSDP processes) leaves the previous checkpoint
  loadable bit for bit, and the next save at that path works.
* A sharded commit interrupted between its two renames still loads and is finished by the next save.
* Saves called by rank 0 alone: a clear error within ``save_timeout`` under FSDP and DDP.
* Async saves: a sharded one commits a host copy; a failed one is raised when a worker returns.
* ``handloom consolidate`` turns a sharded checkpoint into one file for plain PyTorch.
* A checkpoint written by one FSDP process loads into two.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from handloom import Fabric
from handloom.checkpoint import CheckpointFolder
from handloom.checkpoint import staging as staging_dirs
from handloom.cli import main as handloom_main
from handloom.launcher import WorkerFailedError
from handloom.strategies import DDPStrategy, FSDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Full copies of the parameters and (if given) the Adam state, by parameter name."""
    model = getattr(model, "module", model)
    names = {id(p): n for n, p in model.named_parameters()}
    snapshot: dict[str, Any] = {"params": {n: _full(p) for n, p in model.named_parameters()}}
    if optimizer is not None:
        snapshot["adam"] = {
            f"{names[id(p)]}.{key}": _full(value)
            for p, s in optimizer.state.items()
            for key, value in s.items()
        }
    return snapshot


def _assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for part, values in expected.items():
        assert actual[part].keys() == values.keys(), part
        for name, value in values.items():
            torch.testing.assert_close(actual[part][name], value, rtol=0, atol=0, msg=f"{part} {name}")


def _train(fabric: Fabric, steps: int = 2, seed: int = 0) -> tuple[Any, Any]:
    model = _model(seed)
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=0.1))
    for step in range(steps):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * step + fabric.global_rank))
        fabric.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _load_plain(path: Path, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` into a plain model and optimizer under a one-device Fabric."""
    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = fabric.setup(*_plain_pair(seed=99))
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": -1}
    fabric.load(path, state, **kwargs)
    return _snapshot(model, optimizer), state


def _plain_pair(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


@pytest.fixture
def one_process_fsdp() -> Iterator[Fabric]:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}))
    fabric.launch()
    yield fabric
    fabric.strategy.teardown()


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- SIGKILL in the middle of a save ---------------------------------------------------------------


def _start(script: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:  # a file, not a pipe: a full pipe would stall the script
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the workers it starts die with it
        )


def _wait_for(
    process: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool], what: str, patience: float = 90
) -> None:
    deadline = time.monotonic() + patience
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the script ended (status {process.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.001)


def _running_in_group(group: int) -> list[int]:
    """The processes of ``group`` that have not ended (zombies waiting to be reaped have)."""
    running = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            running.append(int(entry.name))
    return running


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _running_in_group(process.pid):  # the workers it started were killed too
        if time.monotonic() > deadline:
            pytest.fail("processes of the killed job are still running")
        time.sleep(0.01)


_FILE_SCRIPT = """
import sys
import torch
from handloom import Fabric

path = sys.argv[1]
fabric = Fabric(accelerator="cpu", devices=1)
fabric.save(path, {"version": 0, "weights": torch.arange(10.0)})
open(sys.argv[2], "w").close()
big = torch.empty(40_000_000)  # 160 MB, so that a write takes long enough to be caught mid-way
for version in range(1, 10_000):
    big.fill_(version)
    fabric.save(path, {"version": version, "weights": big})
"""


def test_sigkill_during_a_file_save_never_leaves_a_partial_checkpoint(tmp_path: Path) -> None:
    folder = CheckpointFolder(tmp_path / "ckpts")
    path = folder.path(5)
    good = tmp_path / "first-save-done"
    log = tmp_path / "script.log"
    process = _start(_FILE_SCRIPT, log, str(path), str(good))

    def writing() -> bool:  # a large checkpoint's temporary file is on disk, partly written
        if not good.exists():
            return False
        for entry in path.parent.glob(f".{path.name}.*.tmp"):
            try:
                if entry.stat().st_size > 1_000_000:
                    return True
            except FileNotFoundError:  # renamed in the meantime
                pass
        return False

    # Each large save takes a good fraction of a second, so a temporary file shows up at once if
    # saves write one; a save that wrote the target in place would never show one.
    _wait_for(process, log, writing, "a large save's temporary file", patience=30)
    _kill_group(process)
    leftovers = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    assert leftovers, "the kill did not land during a write"

    fabric = Fabric(accelerator="cpu", devices=1)
    data = fabric.load(path)  # the previous complete version, never a partial one
    if data["version"] == 0:
        assert torch.equal(data["weights"], torch.arange(10.0))
    else:
        assert data["weights"].shape == (40_000_000,)
        assert bool((data["weights"] == data["version"]).all())
    assert torch.load(path, weights_only=True, mmap=True)["version"] == data["version"]

    os.replace(path, tmp_path / "kept.ckpt")  # as if the very first save had been killed
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(leftovers[0].name)}.*interrupted"):
        fabric.load(path)
    assert sorted(folder.prune()) == leftovers
    assert _hidden(path.parent) == []


_SHARDED_SCRIPT = """
import sys
from pathlib import Path
import torch
from torch import nn
from handloom import Fabric
from handloom.strategies import FSDPStrategy

sys.path.insert(0, sys.argv[2])
from test_checkpoint_crash import _snapshot, _train

root = Path(sys.argv[1])

def main(fabric):
    model, optimizer = _train(fabric)
    fabric.save(root / "ckpt", {"model": model, "optimizer": optimizer, "step": 1})
    expected = _snapshot(model, optimizer)
    if fabric.is_global_zero:
        torch.save(expected, root / "expected.pt")
        (root / "first-save-done").touch()
    torch.manual_seed(1)
    big = fabric.setup_module(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)]))  # 100 MB
    for step in range(2, 10_000):
        with torch.no_grad():
            for param in big.parameters():
                param.fill_(step)
        fabric.save(root / "ckpt", {"model": model, "optimizer": optimizer, "big": big, "step": step})

Fabric(accelerator="cpu", devices=2, strategy=FSDPStrategy(start_method="fork")).launch(main)
"""


def test_sigkill_during_a_sharded_save_keeps_the_previous_checkpoint(
    tmp_path: Path, one_process_fsdp: Fabric
) -> None:
    target = tmp_path / "ckpt"
    staging = staging_dirs.staging_path(target)
    log = tmp_path / "script.log"
    process = _start(_SHARDED_SCRIPT, log, str(tmp_path), str(Path(__file__).parent))

    def writing() -> bool:  # the next checkpoint's shards are being written
        if not (tmp_path / "first-save-done").exists():
            return False
        try:
            return any(entry.suffix == ".distcp" for entry in staging.iterdir())
        except FileNotFoundError:
            return False

    _wait_for(process, log, writing, "the second sharded save was under way")
    _kill_group(process)
    assert staging.is_dir() and not staging_dirs.is_complete(staging)

    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    snapshot, state = _load_plain(target)
    _assert_same(snapshot, expected)  # model and optimizer as the last committed save left them
    if state["step"] != 1:  # the kill came during a later save; the one before it is complete
        assert state["step"] > 1
        big = Fabric(accelerator="cpu", devices=1).load(target)["big"]
        assert all(bool((value == state["step"]).all()) for value in big.values())

    with pytest.raises(FileNotFoundError, match="staging directory of a sharded save that did not finish"):
        Fabric(accelerator="cpu", devices=1).load(staging, {"model": _model()})

    fabric = one_process_fsdp  # the next save at that path, now by one process
    model, optimizer = _train(fabric, steps=1, seed=3)
    fabric.save(target, {"model": model, "optimizer": optimizer, "step": 50})
    assert _hidden(tmp_path) == []  # the interrupted staging directory is gone
    snapshot, state = _load_plain(target)
    _assert_same(snapshot, _snapshot(model, optimizer))
    assert state["step"] == 50


@pytest.mark.parametrize("staging_complete", [True, False])
def test_a_commit_interrupted_between_its_renames_loads_and_is_finished_by_the_next_save(
    tmp_path: Path, one_process_fsdp: Fabric, staging_complete: bool
) -> None:
    fabric = one_process_fsdp
    target = tmp_path / "ckpt"
    model, optimizer = _train(fabric, steps=1)
    fabric.save(target, {"model": model, "optimizer": optimizer, "step": 1})
    first = _snapshot(model, optimizer)
    _train_more(fabric, model, optimizer)
    fabric.save(tmp_path / "next", {"model": model, "optimizer": optimizer, "step": 2})
    second = _snapshot(model, optimizer)
    # Replay a crash inside staging.commit: "target -> .old" done, ".staging -> target" not.
    os.replace(target, staging_dirs.old_path(target))
    os.replace(tmp_path / "next", staging_dirs.staging_path(target))
    if not staging_complete:  # the crash came before the marker was written
        (staging_dirs.staging_path(target) / staging_dirs.MARKER).unlink()

    snapshot, state = _load_plain(target)
    _assert_same(snapshot, second if staging_complete else first)
    assert state["step"] == (2 if staging_complete else 1)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(target, state)  # under FSDP too
    _assert_same(_snapshot(model, optimizer), second if staging_complete else first)

    _train_more(fabric, model, optimizer)
    fabric.save(target, {"model": model, "optimizer": optimizer, "step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    snapshot, state = _load_plain(target)
    _assert_same(snapshot, _snapshot(model, optimizer))
    assert state["step"] == 3


def _train_more(fabric: Fabric, model: Any, optimizer: Any) -> None:
    fabric.backward(model(torch.randn(4, 5)).pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


def test_saving_a_sharded_checkpoint_over_a_directory_that_is_not_one_is_refused(
    tmp_path: Path, one_process_fsdp: Fabric
) -> None:
    fabric = one_process_fsdp
    model = fabric.setup_module(_model())
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"results.*not a checkpoint.*not empty"):
        fabric.save(mine, {"model": model})
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    fabric.save(tmp_path / "empty", {"model": model})
    fabric.save(tmp_path / "empty", {"model": model})  # and a checkpoint is replaced
    assert staging_dirs.is_complete(tmp_path / "empty")


# --- saves called by rank 0 alone -----------------------------------------------------------------


def _save_on_rank_zero_only(fabric: Fabric, path: Path) -> tuple[str, float] | None:
    model = fabric.setup_module(_model())
    outcome = None
    if fabric.is_global_zero:
        start = time.monotonic()
        try:
            fabric.save(path, {"model": model})
        except RuntimeError as err:
            outcome = (str(err), time.monotonic() - start)
    fabric.barrier()  # rank 1 waits here meanwhile, and goes on once rank 0 has the error
    return outcome


@pytest.mark.parametrize("name", ["fsdp", "ddp"])
def test_a_save_on_rank_zero_alone_fails_fast_naming_the_missing_rank(tmp_path: Path, name: str) -> None:
    strategy: Any = (FSDPStrategy if name == "fsdp" else DDPStrategy)(
        start_method="fork", save_timeout=timedelta(seconds=3)
    )
    outcome = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(
        functools.partial(_save_on_rank_zero_only, path=tmp_path / "ckpt")
    )
    assert outcome is not None, "the save on rank 0 alone did not fail"
    message, seconds = outcome
    assert 3 <= seconds < 13
    assert "every rank must call it" in message and "rank(s) [1] did not call it within 3 s" in message
    assert "if fabric.is_global_zero:" in message and "save_timeout" in message
    assert not (tmp_path / "ckpt").exists()


def _ddp_save_on_every_rank(fabric: Fabric, path: Path) -> list[float]:
    model = fabric.setup_module(_model())
    fabric.save(path, {"model": model, "step": 4})
    data = fabric.load(path)  # every rank reads what rank 0 wrote, with no barrier in between
    steps = fabric.all_gather(torch.tensor(float(data["step"])))
    assert isinstance(steps, torch.Tensor)
    return steps.tolist()


def test_a_ddp_save_on_every_rank_writes_one_file_all_ranks_read(tmp_path: Path) -> None:
    steps = Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork")).launch(
        functools.partial(_ddp_save_on_every_rank, path=tmp_path / "model.ckpt")
    )
    assert steps == [4.0, 4.0]
    saved = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert set(saved) == {"model", "step"} and saved["model"].keys() == _model().state_dict().keys()


def _failing_async_save(fabric: Fabric, path: Path) -> None:
    model = fabric.setup_module(_model())
    fabric.save(path, {"model": model}, async_save=True)  # rank 0 writes; fails in the background


def test_a_failed_async_save_fails_the_launched_worker(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "model.ckpt"
    with pytest.raises(WorkerFailedError, match=rf"CheckpointSaveError.*{path}") as info:
        Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork")).launch(
            functools.partial(_failing_async_save, path=path)
        )
    assert info.value.rank == 0


# --- two FSDP processes: async save, consolidate, 1 -> 2 processes -------------------------------


def _two_process_checks(fabric: Fabric, directory: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    results: dict[str, Any] = {}
    # 1 -> 2: a checkpoint one FSDP process wrote, resharded onto two.
    model, optimizer = _train(fabric, steps=1, seed=7)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(directory / "by-one-process", state)
    param = next(model.parameters())
    results["loaded"] = _snapshot(model, optimizer)
    results["loaded_step"] = state["step"]
    results["local_rows"] = (param.to_local().shape[0], param.shape[0])

    # The checkpoint handloom consolidate will read.
    model, optimizer = _train(fabric)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scheduler.step()
    fabric.save(directory / "for-consolidate", {"model": model, "optimizer": optimizer, "sched": scheduler})
    results["consolidate"] = _snapshot(model, optimizer)
    results["lr"] = optimizer.param_groups[0]["lr"]

    # Async: the shards are written late (slow storage), after training changed the parameters.
    write_data = FileSystemWriter.write_data

    def slow_write_data(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)
        return write_data(self, *args, **kwargs)

    FileSystemWriter.write_data = slow_write_data  # type: ignore[method-assign]
    results["async"] = _snapshot(model, optimizer)
    fabric.save(directory / "async", {"model": model, "optimizer": optimizer, "step": 9}, async_save=True)
    results["committed_on_return"] = staging_dirs.is_complete(directory / "async")
    _train_more(fabric, model, optimizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(100.0)
    fabric.save(directory / "async-2", {"model": model, "optimizer": optimizer, "step": 10}, async_save=True)
    results["async_2"] = _snapshot(model, optimizer)
    return results  # the launched worker waits for the save in flight before it returns


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    directory = tmp_path_factory.mktemp("two-processes")
    one = Fabric(accelerator="cpu", devices=1, strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}))
    one.launch()
    try:
        model, optimizer = _train(one, steps=3, seed=5)
        one.save(directory / "by-one-process", {"model": model, "optimizer": optimizer, "step": 3})
        saved_by_one = _snapshot(model, optimizer)
    finally:
        one.strategy.teardown()
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, start_method="fork")
    results = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(
        functools.partial(_two_process_checks, directory=directory)
    )
    return directory, saved_by_one, results


def test_a_checkpoint_written_by_one_process_loads_into_two(
    two_processes: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    _, saved_by_one, results = two_processes
    _assert_same(results["loaded"], saved_by_one)
    assert results["loaded_step"] == 3
    assert results["local_rows"] == (6, 12)  # each process holds half of the first layer


def test_a_sharded_async_save_commits_the_state_of_when_it_returned(
    two_processes: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    directory, _, results = two_processes
    assert not results["committed_on_return"]  # save returned before the shards were written
    for name, expected_step in (("async", 9), ("async-2", 10)):
        snapshot, state = _load_plain(directory / name)
        _assert_same(snapshot, results[name.replace("-", "_")])
        assert state["step"] == expected_step
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def test_consolidate_writes_one_file_that_plain_torch_loads(
    two_processes: tuple[Path, dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    directory, _, results = two_processes
    out = tmp_path / "full.pt"
    done = subprocess.run(
        [sys.executable, "-m", "handloom", "consolidate", str(directory / "for-consolidate"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout

    data = torch.load(out, weights_only=True)  # plain PyTorch from here on
    model, optimizer = _plain_pair(seed=99)
    model.load_state_dict(data["model"])
    optimizer.load_state_dict(data["optimizer"])
    _assert_same(_snapshot(model, optimizer), results["consolidate"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scheduler.load_state_dict(data["sched"])
    assert optimizer.param_groups[0]["lr"] == results["lr"] and scheduler.last_epoch == 1


def test_consolidate_errors(
    two_processes: tuple[Path, dict[str, Any], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = two_processes[0] / "for-consolidate"
    out = tmp_path / "full.pt"
    out.write_bytes(b"someone else's file")
    assert handloom_main(["consolidate", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert "full.pt" in err and "already exists" in err and "--overwrite" in err
    assert err.count("handloom consolidate") == 1
    assert out.read_bytes() == b"someone else's file"

    assert handloom_main(["consolidate", str(source), "--output_file", str(out), "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["model"].keys() == _model().state_dict().keys()

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "__0_0.distcp").write_bytes(b"")
    assert handloom_main(["consolidate", str(incomplete), str(tmp_path / "x.pt")]) == 2
    assert "without handloom.json" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    assert handloom_main(["consolidate", str(tmp_path / "missing"), str(tmp_path / "x.pt")]) == 2
    assert "not a sharded checkpoint directory" in capsys.readouterr().err


def test_a_damaged_shard_is_an_error_naming_the_checkpoint_and_the_file(
    two_processes: tuple[Path, dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(two_processes[0] / "for-consolidate", damaged)
    shard = damaged / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    named = r"damaged'.*__1_0\.distcp"  # the checkpoint, and which of its files is damaged
    model, optimizer = _plain_pair(seed=0)
    fabric = Fabric(accelerator="cpu", devices=1)
    with pytest.raises(RuntimeError, match=named):
        fabric.load(damaged, {"model": model, "optimizer": optimizer})
    with pytest.raises(RuntimeError, match=named):
        fabric.load(damaged)
    from handloom.checkpoint.consolidate import consolidate

    with pytest.raises(RuntimeError, match=named):
        consolidate(damaged, tmp_path / "out.pt")
