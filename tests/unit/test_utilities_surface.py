"""``handloom.utilities`` at Lightning's paths: every name Lightning's modules offer, and their behaviour.

The name lists and signatures below are Lightning Fabric 2.6's (``lightning.fabric.utilities.*``).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import inspect
import json
import logging
import os
import random
import subprocess
import sys
import warnings
from collections import defaultdict, namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, TensorDataset

from handloom import Fabric
from handloom import seed as seed_module
from handloom.loggers import CSVLogger, TensorBoardLogger

# --- every public name at the same path -------------------------------------------------------
LIGHTNING_NAMES: dict[str, list[str]] = {
    "": [
        "disable_possible_user_warnings",
        "is_shared_filesystem",
        "LightningEnum",
        "measure_flops",
        "move_data_to_device",
        "rank_zero_deprecation",
        "rank_zero_info",
        "rank_zero_only",
        "rank_zero_warn",
        "suggested_max_num_workers",
        "AttributeDict",
        "Throughput",
        "ThroughputMonitor",
    ],
    "apply_func": [
        "apply_to_collection",
        "convert_tensors_to_scalars",
        "convert_to_tensors",
        "move_data_to_device",
    ],
    "cloud_io": ["get_filesystem"],
    "consolidate_checkpoint": [],
    "data": ["AttributeDict", "has_iterable_dataset", "has_len", "sized_len", "suggested_max_num_workers"],
    "device_dtype_mixin": [],
    "device_parser": [],
    "distributed": ["DistributedSamplerWrapper", "ReduceOp", "group", "is_shared_filesystem"],
    "enums": ["LightningEnum"],
    "exceptions": ["MisconfigurationException"],
    "imports": [],
    "logger": [],
    "optimizer": [],
    "rank_zero": [
        "LightningDeprecationWarning",
        "WarningCache",
        "rank_prefixed_message",
        "rank_zero_debug",
        "rank_zero_deprecation",
        "rank_zero_info",
        "rank_zero_only",
        "rank_zero_warn",
    ],
    "registry": [],
    "seed": ["max_seed_value", "min_seed_value", "pl_worker_init_function", "reset_seed", "seed_everything"],
    "spike": ["SpikeDetection", "TrainingSpikeException"],
    "throughput": ["Throughput", "ThroughputMonitor", "get_available_flops", "measure_flops"],
    "types": [
        "CollectibleGroup",
        "Optimizable",
        "ProcessGroup",
        "RedOpType",
        "ReduceOp",
        "Steppable",
        "UntypedStorage",
    ],
    "warnings": ["LightningDeprecationWarning", "PossibleUserWarning", "disable_possible_user_warnings"],
    "testing": ["_runif_reasons"],
}
# Private names programs import anyway.
PRIVATE_NAMES: dict[str, list[str]] = {
    "device_dtype_mixin": ["_DeviceDtypeModuleMixin", "_update_properties"],
    "distributed": ["_distributed_is_initialized"],
    "imports": [
        "_IS_INTERACTIVE",
        "_IS_WINDOWS",
        "_NUMPY_AVAILABLE",
        "_PYTHON_GREATER_EQUAL_3_10_0",
        "_TORCHMETRICS_GREATER_EQUAL_1_0_0",
        "_TORCH_GREATER_EQUAL_2_2",
        "_TORCH_GREATER_EQUAL_2_3",
        "_TORCH_GREATER_EQUAL_2_4",
        "_TORCH_GREATER_EQUAL_2_5",
        "_TORCH_GREATER_EQUAL_2_6",
    ],
    "optimizer": ["_optimizer_to_device", "_optimizers_to_device"],
    "rank_zero": ["_get_rank"],
    "types": ["_DEVICE", "_LRScheduler", "_MAP_LOCATION_TYPE", "_PARAMETERS", "_PATH", "_Stateful"],
}

# Lightning's parameter names, in order (a program may pass any of them by keyword).
LIGHTNING_SIGNATURES: dict[str, list[str]] = {
    "apply_func.move_data_to_device": ["batch", "device"],
    "apply_func.convert_to_tensors": ["data", "device"],
    "apply_func.convert_tensors_to_scalars": ["data"],
    "apply_func.apply_to_collection": [
        "data", "dtype", "function", "args", "wrong_dtype", "include_none", "allow_frozen", "kwargs"
    ],
    "cloud_io.get_filesystem": ["path", "kwargs"],
    "data.suggested_max_num_workers": ["local_world_size"],
    "data.has_len": ["dataloader"],
    "data.sized_len": ["dataloader"],
    "data.has_iterable_dataset": ["dataloader"],
    "distributed.is_shared_filesystem": ["strategy", "path", "timeout"],
    "distributed.DistributedSamplerWrapper": ["sampler", "args", "kwargs"],
    "rank_zero.rank_zero_warn": ["message", "stacklevel", "kwargs"],
    "rank_zero.rank_zero_deprecation": ["message", "stacklevel", "kwargs"],
    "rank_zero.rank_zero_info": ["args", "stacklevel", "kwargs"],
    "rank_zero.rank_zero_debug": ["args", "stacklevel", "kwargs"],
    "rank_zero.rank_prefixed_message": ["message", "rank"],
    "seed.seed_everything": ["seed", "workers", "verbose"],  # handloom adds keyword-only `rank`
    "seed.reset_seed": [],
    "seed.pl_worker_init_function": ["worker_id", "rank"],
    "spike.SpikeDetection": [
        "mode", "window", "warmup", "atol", "rtol", "exclude_batches_path", "finite_only"
    ],
    "spike.SpikeDetection.on_train_batch_end": ["self", "fabric", "loss", "batch", "batch_idx"],
    "spike.TrainingSpikeException": ["batch_idx", "args", "kwargs"],
    "throughput.Throughput": ["available_flops", "world_size", "window_size", "separator"],
    "throughput.Throughput.update": ["self", "time", "batches", "samples", "lengths", "flops"],
    "throughput.measure_flops": ["model", "forward_fn", "loss_fn"],
    "throughput.get_available_flops": ["device", "dtype"],
    "warnings.disable_possible_user_warnings": ["module"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(LIGHTNING_NAMES))
def test_every_lightning_name_exists_at_the_same_path(module: str) -> None:
    path = "handloom.utilities" + (f".{module}" if module else "")
    imported = importlib.import_module(path)
    wanted = LIGHTNING_NAMES[module] + PRIVATE_NAMES.get(module, [])
    missing = [name for name in wanted if not hasattr(imported, name)]
    assert not missing, f"{path} lacks {missing}"
    for name in LIGHTNING_NAMES[module]:
        assert name in getattr(imported, "__all__", []), f"{path}.__all__ lacks {name}"


@pytest.mark.parametrize("qualname", sorted(LIGHTNING_SIGNATURES))
def test_signatures_take_lightnings_parameters(qualname: str) -> None:
    module, *attributes = qualname.split(".")
    obj: Any = importlib.import_module(f"handloom.utilities.{module}")
    for attribute in attributes:
        obj = getattr(obj, attribute)
    names = list(inspect.signature(obj).parameters)
    expected = LIGHTNING_SIGNATURES[qualname]
    assert names[: len(expected)] == expected
    extra = list(inspect.signature(obj).parameters.values())[len(expected) :]
    assert all(p.kind is p.KEYWORD_ONLY for p in extra)  # handloom's additions never shift Lightning's


def test_loggers_logger_module_lazy_imports_and_the_rank_read_at_import() -> None:
    from handloom.loggers.logger import Logger, rank_zero_experiment

    assert Logger is importlib.import_module("handloom.loggers").Logger
    assert callable(rank_zero_experiment)
    code = (
        "import sys, handloom; print(any(m.startswith('handloom.utilities') for m in sys.modules));"
        " import handloom.utilities as u; print(u.rank_zero_only.rank); u.AttributeDict;"
        " print([m for m in ('fsspec', 'tensorboard', 'tensorboardX', 'torchmetrics') if m in sys.modules])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")}
    env.update(LOCAL_RANK="2", SLURM_PROCID="5")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["False", "2", "[]"]


# --- item 2: seed_everything exports the seed, reset_seed re-applies it -----------------------
@pytest.fixture
def fresh_seed_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("_current_seed", "_seed_workers"):
        monkeypatch.setattr(seed_module, name, getattr(seed_module, name))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
    yield


def draws() -> tuple[float, float]:
    return random.random(), torch.rand(()).item()


@pytest.mark.usefixtures("fresh_seed_state")
def test_seed_everything_exports_and_reset_seed_reapplies(monkeypatch: pytest.MonkeyPatch) -> None:
    from handloom.utilities.seed import reset_seed, seed_everything

    reset_seed()  # nothing exported yet: does nothing
    assert "PL_GLOBAL_SEED" not in os.environ
    assert seed_everything(42, workers=True) == 42
    assert (os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"]) == ("42", "1")
    first = draws()
    reset_seed()
    assert draws() == first
    assert os.environ["PL_SEED_WORKERS"] == "1"  # reset_seed keeps the workers flag

    # Without a seed: the exported one, silently.
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seed_everything() == 7
    assert os.environ["PL_SEED_WORKERS"] == "0"
    monkeypatch.setenv("PL_GLOBAL_SEED", "seven")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED='seven' is not an integer"):
        seed_everything()


@pytest.mark.usefixtures("fresh_seed_state")
def test_no_seed_anywhere_is_zero_with_a_warning_only_when_verbose() -> None:
    from handloom.utilities.seed import seed_everything

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seed_everything(verbose=False) == 0
    del os.environ["PL_GLOBAL_SEED"]
    with pytest.warns(UserWarning, match="PL_GLOBAL_SEED is not set, so the seed is 0") as w:
        assert seed_everything() == 0
    assert w[0].filename == __file__  # points at the caller
    assert os.environ["PL_GLOBAL_SEED"] == "0"


@pytest.mark.usefixtures("fresh_seed_state")
def test_a_child_process_inherits_the_seed() -> None:
    from handloom.utilities.seed import seed_everything

    seed_everything(1234, workers=True)
    expected = torch.rand(3).tolist()
    code = (
        "import torch; from handloom.seed import current_seed, seed_workers_enabled, reset_seed;"
        " print(current_seed(), seed_workers_enabled()); reset_seed(); print(torch.rand(3).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seed_line, draws_line = out.stdout.splitlines()
    assert seed_line == "1234 True"
    assert json.loads(draws_line) == expected


@pytest.mark.usefixtures("fresh_seed_state")
def test_pl_worker_init_function_gives_distinct_reproducible_streams() -> None:
    from handloom.utilities.rank_zero import rank_zero_only
    from handloom.utilities.seed import pl_worker_init_function, seed_everything

    seed_everything(3, verbose=False)
    streams = {}
    for rank in (0, 1):
        for worker in (0, 1):
            pl_worker_init_function(worker, rank=rank)
            streams[rank, worker] = draws()
    assert len(set(streams.values())) == 4
    pl_worker_init_function(1, rank=1)
    assert draws() == streams[1, 1]
    previous = rank_zero_only.rank
    try:
        rank_zero_only.rank = 1
        pl_worker_init_function(0)  # rank from rank_zero_only
        assert draws() == streams[1, 0]
    finally:
        rank_zero_only.rank = previous


# --- item 3 and the apply_func module ---------------------------------------------------------
class InPlaceBatch:
    """A user class whose ``to`` moves its tensor in place and returns nothing."""

    def __init__(self) -> None:
        self.x = torch.ones(2)

    def to(self, device: Any) -> None:
        self.x = self.x.to(device)


def test_move_data_to_device_keeps_objects_whose_to_returns_none() -> None:
    from handloom.utilities.apply_func import move_data_to_device

    batch = InPlaceBatch()
    assert move_data_to_device(batch, "meta") is batch
    assert batch.x.device.type == "meta"
    nested = {"batch": InPlaceBatch(), "t": torch.ones(1), "n": 3}
    moved = move_data_to_device(nested, torch.device("meta"))
    assert moved["batch"] is nested["batch"] and moved["batch"].x.device.type == "meta"
    assert moved["t"].device.type == "meta" and moved["n"] == 3


Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: torch.Tensor
    b: int = 1
    c: int = dataclasses.field(init=False, default=5)


def test_apply_to_collection_follows_lightning() -> None:
    from handloom.utilities.apply_func import apply_to_collection

    def add(value: int, amount: int, *, scale: int = 1) -> int:
        return (value + amount) * scale

    data = {"a": [1, (2, 3.0)], "p": Point(4, "s"), "d": defaultdict(list, {"k": 5})}
    out = apply_to_collection(data, int, add, 1, scale=10)
    assert out["a"] == [20, (30, 3.0)] and out["p"] == Point(50, "s")
    assert isinstance(out["d"], defaultdict) and out["d"]["k"] == 60 and out["d"].default_factory is list
    # wrong_dtype: bools are ints, but excluded here
    assert apply_to_collection([True, 2], int, lambda v: -v, wrong_dtype=bool) == [True, -2]
    # include_none=False drops the entries the function turned into None
    assert apply_to_collection({"a": 1, "b": 2, "c": [1, 2]}, int, lambda v: None if v == 1 else v,
                               include_none=False) == {"b": 2, "c": [2]}  # fmt: skip
    frozen = Frozen(torch.zeros(1))
    doubled = apply_to_collection(frozen, torch.Tensor, lambda t: t + 1)
    assert doubled.a.item() == 1 and frozen.a.item() == 0 and doubled.c == 5


def test_convert_to_tensors_and_back_to_scalars() -> None:
    from handloom.utilities.apply_func import convert_tensors_to_scalars, convert_to_tensors

    converted = convert_to_tensors({"b": True, "i": 3, "f": 0.5, "t": torch.ones(1)}, "meta")
    assert {k: v.dtype for k, v in converted.items()} == {
        "b": torch.uint8, "i": torch.int32, "f": torch.float32, "t": torch.float32
    }  # fmt: skip
    assert all(v.device.type == "meta" for v in converted.values())
    assert convert_tensors_to_scalars({"x": torch.tensor(2.5), "y": [torch.tensor(3)]}) == {
        "x": 2.5,
        "y": [3],
    }
    with pytest.raises(ValueError, match=r"got a tensor of shape \(2,\)"):
        convert_tensors_to_scalars(torch.ones(2))


# --- item 4: Throughput checks its arguments as Lightning does --------------------------------
def test_throughput_totals_must_grow_and_lengths_must_not_start_midway() -> None:
    from handloom.utilities.throughput import Throughput

    throughput = Throughput(window_size=2)
    throughput.update(time=1.0, batches=1, samples=4)
    for field in ("time", "batches", "samples"):
        point = {"time": 2.0, "batches": 2, "samples": 8}
        point[field] = {"time": 1.0, "batches": 1, "samples": 4}[field]
        with pytest.raises(ValueError, match=rf"update\({field}=.*\) equals the {field} of the"):
            throughput.update(**point)
    with pytest.raises(RuntimeError, match=r"update\(lengths=80\) follows an update without lengths"):
        throughput.update(time=2.0, batches=2, samples=8, lengths=80)
    throughput.update(time=2.0, batches=2, samples=8)  # nothing was recorded by the failed calls
    assert throughput.compute()["device/samples_per_sec"] == 4.0

    with_lengths = Throughput(window_size=2)
    with_lengths.update(time=1.0, batches=1, samples=4, lengths=40)
    with pytest.raises(ValueError, match=r"update\(lengths=40\) equals the lengths"):
        with_lengths.update(time=2.0, batches=2, samples=8, lengths=40)
    with_lengths.update(time=2.0, batches=2, samples=8)  # dropping lengths is allowed, as in Lightning
    with_lengths.reset()
    with_lengths.update(time=0.5, batches=1, samples=4, lengths=9)  # a new start after reset()


# --- rank_zero --------------------------------------------------------------------------------
@pytest.fixture
def rank_one() -> Iterator[None]:
    from handloom.utilities.rank_zero import rank_zero_only

    previous = rank_zero_only.rank
    rank_zero_only.rank = 1
    yield
    rank_zero_only.rank = previous


def test_rank_zero_only_follows_its_settable_rank(rank_one: None) -> None:
    from handloom.utilities import rank_zero_only, rank_zero_warn
    from handloom.utilities.rank_zero import WarningCache, rank_prefixed_message

    calls: list[int] = []

    @rank_zero_only
    def record(value: int) -> int:
        calls.append(value)
        return value

    guarded_with_default = rank_zero_only(record, default=-1)
    assert record(1) is None and guarded_with_default(2) == -1 and calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rank_zero_warn("not shown on rank 1")
    rank_zero_only.rank = 0
    assert record(3) == 3 and calls == [3]
    cache = WarningCache()
    with pytest.warns(UserWarning, match="once") as shown:
        cache.warn("once")
        cache.warn("once")
    assert len(shown) == 1
    rank_zero_only.rank = None
    with pytest.raises(RuntimeError, match=r"rank_zero_only\.rank is None"):
        record(4)
    assert rank_prefixed_message("hi", 3) == "[rank: 3] hi" and rank_prefixed_message("hi", None) == "hi"


def test_rank_zero_logging_and_deprecation(caplog: pytest.LogCaptureFixture) -> None:
    from handloom.utilities.rank_zero import (
        LightningDeprecationWarning,
        rank_zero_deprecation,
        rank_zero_info,
    )

    with caplog.at_level(logging.INFO):
        rank_zero_info("hello %s", "there")
    assert [r.getMessage() for r in caplog.records] == ["hello there"]
    with pytest.warns(LightningDeprecationWarning, match="old"):
        rank_zero_deprecation("old")


def test_the_starting_rank_comes_from_the_first_variable_set() -> None:
    from handloom.utilities.rank_zero import _rank_from_environment

    assert _rank_from_environment({"LOCAL_RANK": "2", "SLURM_PROCID": "5"}) == 2  # SLURM's comes last
    assert _rank_from_environment({"SLURM_PROCID": "5", "JSM_NAMESPACE_RANK": "6"}) == 5
    assert _rank_from_environment({"RANK": "1", "LOCAL_RANK": "0"}) == 1
    assert _rank_from_environment({}) is None


def test_rank_zero_experiment_hands_other_ranks_a_no_op(rank_one: None) -> None:
    from handloom.loggers.logger import Logger, rank_zero_experiment

    class Writer:
        def add(self, value: int) -> int:
            return value

    class MyLogger(Logger):
        name = "n"
        version = 0

        @property
        @rank_zero_experiment
        def experiment(self) -> Writer:
            return Writer()

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    assert MyLogger().experiment.add(1) is not None  # a no-op, not the writer's result
    MyLogger().experiment[0].add(2)
    MyLogger().experiment["k"] = 3


# --- small modules ----------------------------------------------------------------------------
def test_attribute_dict_enum_exception_and_warnings() -> None:
    from handloom.utilities import AttributeDict, LightningEnum, disable_possible_user_warnings
    from handloom.utilities.exceptions import MisconfigurationException
    from handloom.utilities.warnings import PossibleUserWarning

    state = AttributeDict(model=nn.Linear(2, 2), iter_num=0)
    state.iter_num += 1
    assert state["iter_num"] == 1
    assert repr(state) == '"iter_num": 1\n"model":    Linear(in_features=2, out_features=2, bias=True)'
    assert repr(AttributeDict()) == ""
    del state.iter_num
    with pytest.raises(AttributeError, match="no attribute 'iter_num'"):
        _ = state.iter_num

    class Mode(LightningEnum):
        TRAIN = "Train"
        EVAL = "eval"

    assert Mode.TRAIN == "train" and Mode.TRAIN == "TRAIN" and Mode.EVAL != "train"
    assert {Mode.TRAIN: 1}["train"] == 1
    assert Mode.from_str("eval") is Mode.EVAL and Mode.from_str("train", source="value") is Mode.TRAIN
    with pytest.raises(ValueError, match="matches no member"):
        Mode.from_str("test")
    with pytest.warns(UserWarning, match="matches no member"):
        assert Mode.try_from_str("test") is None

    assert issubclass(MisconfigurationException, Exception)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        disable_possible_user_warnings()
        warnings.warn("maybe", PossibleUserWarning, stacklevel=1)  # ignored, not raised


def test_dataloader_queries_and_worker_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    from handloom.utilities import data

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    sized = DataLoader(TensorDataset(torch.arange(4)), batch_size=2)
    stream = DataLoader(Stream())
    assert data.sized_len(sized) == 2 and data.sized_len(stream) is None
    assert data.has_len(sized) and not data.has_len(stream)
    assert data.has_iterable_dataset(stream) and not data.has_iterable_dataset(sized)
    with pytest.warns(UserWarning, match="length of 0"):
        assert data.has_len([])
    monkeypatch.setattr(data, "_num_cpus_available", lambda: 16)
    assert [data.suggested_max_num_workers(n) for n in (1, 2, 8, 16)] == [15, 7, 1, 1]
    with pytest.raises(ValueError, match=r"suggested_max_num_workers\(local_world_size=0\)"):
        data.suggested_max_num_workers(0)


def test_distributed_sampler_wrapper_splits_any_sampler() -> None:
    from handloom.utilities.distributed import DistributedSamplerWrapper

    sampler = SequentialSampler(range(7))
    parts = [list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert parts == [[0, 2, 4, 6], [1, 3, 5, 0]]  # padded from the start, as DistributedSampler does
    shuffled = [list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert shuffled[0] == list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=0, seed=3))
    assert shuffled != parts and len(shuffled[0] + shuffled[1]) == 8
    assert set(shuffled[0] + shuffled[1]) == set(range(7))
    with pytest.raises(TypeError, match="has no len"):
        DistributedSamplerWrapper(iter(range(3)), num_replicas=1, rank=0)


def test_optimizer_state_moves_but_step_stays() -> None:
    from handloom.utilities.optimizer import _optimizers_to_device

    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(2)}  # Adam's, after a step
    _optimizers_to_device([optimizer], "meta")
    state = optimizer.state[param]
    assert state["exp_avg"].device.type == "meta" and state["step"].device.type == "cpu"


def test_filesystem_consolidate_command_and_runif(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fsspec")
    from handloom.utilities.cloud_io import get_filesystem
    from handloom.utilities.consolidate_checkpoint import _main
    from handloom.utilities.testing import _runif_reasons

    assert "file" in get_filesystem(tmp_path).protocol
    # `python -m handloom.utilities.consolidate_checkpoint FOLDER` runs `handloom consolidate FOLDER`.
    assert _main([str(tmp_path / "missing"), "--output_file", str(tmp_path / "out.pt")]) == 2
    assert "nothing is at that path" in capsys.readouterr().err
    reasons, flags = _runif_reasons(min_torch="1.0", max_torch="99.0", tpu=True, standalone=True)
    assert "TPU" in reasons and flags == {"tpu": True, "standalone": True}
    assert not any(reason.startswith("torch") for reason in reasons)


# --- spike detection --------------------------------------------------------------------------
def test_spike_detection_stops_and_lists_the_batches(tmp_path: Path) -> None:
    from handloom.utilities.spike import SpikeDetection, TrainingSpikeException

    fabric = Fabric(accelerator="cpu", devices=1)
    detector = SpikeDetection(window=3, warmup=2, exclude_batches_path=tmp_path)
    for index, loss in enumerate([5.0, 4.0, 3.5, 3.2, 50.0, 3.0]):  # a jump at batch 1 is in warmup
        if index < 4:
            detector.on_train_batch_end(fabric, torch.tensor(loss), None, index)
            continue
        with pytest.raises(TrainingSpikeException, match="spiked at batch 4") as raised:
            detector.on_train_batch_end(fabric, torch.tensor(loss), None, index)
        assert raised.value.batch_idx == 4
        break
    assert json.loads((tmp_path / "skip_batches.json").read_text()) == [3, 4]

    restored = SpikeDetection()
    restored.load_state_dict(detector.state_dict())  # broken in Lightning 2.6
    assert restored.running_mean == pytest.approx((4.0 + 3.5 + 3.2) / 3)
    assert restored.bad_batches == [3, 4] and restored.window == 3
    with pytest.raises(TrainingSpikeException):
        restored.on_train_batch_end(fabric, torch.tensor(float("nan")), None, 10)
    with pytest.raises(ValueError, match=r"SpikeDetection\(mode='up'\)"):
        SpikeDetection(mode="up")  # type: ignore[arg-type]


# --- items 6 and 7: loggers -------------------------------------------------------------------
class KeywordOnlyLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, Any], int | None]] = []

    def log_metrics(self, *, metrics: dict[str, Any], step: int | None) -> None:
        self.rows.append((metrics, step))


class StepFirstLogger:
    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, Any], int | None]] = []

    def log_metrics(self, step: int | None = None, metrics: dict[str, Any] | None = None) -> None:
        assert metrics is not None
        self.rows.append((metrics, step))


def test_fabric_passes_metrics_and_step_by_keyword() -> None:
    keyword_only, step_first = KeywordOnlyLogger(), StepFirstLogger()
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[keyword_only, step_first])
    fabric.log("loss", torch.tensor(0.5), step=3)
    fabric.log_dict({"a": 1.0}, step=4)
    expected = [({"loss": 0.5}, 3), ({"a": 1.0}, 4)]
    assert keyword_only.rows == expected and step_first.rows == expected


def test_logger_root_dir_stays_as_written_and_files_go_to_the_expanded_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    csv_logger = CSVLogger(root_dir="~/logs")
    tb_logger = TensorBoardLogger(root_dir=Path("~/tb"), name="exp", sub_dir="sub")
    assert csv_logger.root_dir == "~/logs" and tb_logger.root_dir == "~/tb"
    assert csv_logger.log_dir == os.path.join("~/logs", "lightning_logs", "version_0")  # as Lightning's
    assert tb_logger.log_dir == str(home / "tb" / "exp" / "version_0" / "sub")  # expanded, as Lightning's
    csv_logger.log_metrics({"loss": 1.0}, step=0)
    csv_logger.finalize("success")
    with open(home / "logs" / "lightning_logs" / "version_0" / "metrics.csv", newline="") as handle:
        assert [row["loss"] for row in csv.DictReader(handle)] == ["1.0"]
    assert list(cwd.iterdir()) == []  # no literal "~" directory
    # The next version is found under the expanded path too.
    assert CSVLogger(root_dir="~/logs").version == 1


def test_a_lightning_style_logger_may_assign_its_experiment() -> None:
    from handloom.loggers import Logger

    class Assigning(Logger):
        def __init__(self) -> None:
            self.experiment = {"run": 1}  # Lightning's base class has no experiment property

        name = "a"
        version = 0

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    assert Assigning().experiment == {"run": 1}
