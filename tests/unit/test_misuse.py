"""Misuse across the API, as one table.

Each row performs one mistake a user can make (a bad argument, a call in the wrong order, the wrong
object, a missing or damaged file, the wrong kind of checkpoint, sizes that do not fit the world
size, a bad ``handloom`` command line) and states the error it must raise and two patterns its
message must match: one for the offending value as the user wrote it, one for what to do. Every row
also checks that no file under ``tmp_path`` changed: rows with ``prepare`` first write the user's
files (checkpoints, a script, a directory of notes) that the failed call must leave alone.

Everything runs in this process, without process groups: a misuse that only shows with several
processes is represented by what fails at construction (sizes that do not fit ``devices``) or by
the launcher's variables in the environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from handloom import Fabric, cli
from handloom.checkpoint import CheckpointFolder, RandomState
from handloom.environments import LocalEnvironment
from handloom.loggers import CSVLogger
from handloom.plugins.precision import MixedPrecision
from handloom.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from handloom.utilities import Throughput, ThroughputMonitor


@dataclass(frozen=True)
class Misuse:
    """One row: ``call(tmp_path)`` must raise ``error`` whose message matches ``quotes`` and ``fix``.

    Attributes:
        call: Performs the misuse.
        error: The exception type expected.
        quotes: A pattern for the offending value as the user wrote it.
        fix: A pattern for what the message tells the user to do.
        prepare: Writes the user's files under ``tmp_path`` first; the call must leave them as they are.
        status: For ``handloom`` commands, the exit status expected.
    """

    call: Callable[[Path], object]
    error: type[BaseException]
    quotes: str
    fix: str
    prepare: Callable[[Path], object] | None = None
    status: int | None = None


# --- what the rows share ---------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Config:
    """A user's own class, which a safe (``weights_only``) load refuses."""


class PrecisionPlugin:
    """Stands in for a Lightning precision plugin, which handloom does not take as a plugin."""


def cpu(**kwargs: Any) -> Fabric:
    return Fabric(accelerator="cpu", **kwargs)


def set_up(precision: Any = None, width: int = 4) -> tuple[Fabric, Any, Any]:
    fabric = cpu(precision=precision)
    model = Net(width)
    return (fabric, *fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1)))


def not_launched() -> Fabric:
    """A Fabric that runs two processes, before ``launch()`` started them."""
    return cpu(devices=2, strategy="ddp_spawn")


def save_checkpoint(tmp: Path, name: str = "model.ckpt") -> Path:
    fabric, model, optimizer = set_up()
    path = tmp / name
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3})
    return path


def truncated_checkpoint(tmp: Path) -> None:
    whole = save_checkpoint(tmp).read_bytes()
    (tmp / "torn.ckpt").write_bytes(whole[: len(whole) // 2])


def directory_of(*files: str, name: str = "sharded") -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        (tmp / name).mkdir()
        for file in files:
            (tmp / name / file).write_text("{}")

    return prepare


def write_script(tmp: Path) -> None:
    (tmp / "train.py").write_text("print('training')\n")


def torchrun_env(world_size: int, rank: int) -> dict[str, str]:
    """The variables torchrun gives a worker (one node)."""
    return {
        "TORCHELASTIC_RUN_ID": "misuse",
        "WORLD_SIZE": str(world_size),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }


def with_env(env: dict[str, str], make: Callable[[], object]) -> Callable[[Path], object]:
    """A call that runs ``make()`` with ``env`` added to the environment (as a launcher would set it)."""

    def call(tmp: Path) -> object:
        with mock.patch.dict(os.environ, env):
            return make()

    return call


class CommandFailed(Exception):
    """A ``handloom`` command that exited with a non-zero status; the message is its stderr."""

    def __init__(self, status: object, stderr: str) -> None:
        super().__init__(stderr)
        self.status = status


def handloom(*argv: str) -> None:
    """Run ``handloom ARGV`` in this process (never launching anything); raise ``CommandFailed``."""
    stderr = io.StringIO()
    launched = AssertionError("the command was expected to fail before launching")
    with (
        mock.patch.object(cli, "_launch", side_effect=launched),
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            status: object = cli.main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    if status != 0:
        raise CommandFailed(status, stderr.getvalue())


def run_in(tmp: Path, *argv: str) -> None:
    """``handloom run ARGV train.py`` with the script in ``tmp``."""
    handloom("run", *argv, str(tmp / "train.py"))


def keep(model: nn.Module, device_mesh: Any) -> nn.Module:
    """A ``parallelize_fn`` that leaves the model as it is."""
    return model


def clip_the_plain_model(tmp: Path) -> None:
    fabric, model, optimizer = set_up()
    fabric.clip_gradients(model.module, optimizer, max_norm=1.0)  # the user's module, not fabric's


def clip_by_value_and_norm(tmp: Path) -> None:
    fabric, model, optimizer = set_up()
    fabric.clip_gradients(model, optimizer, clip_val=1.0, max_norm=1.0)


def load_raw_from(name: str, target: Callable[[Any], Any]) -> Callable[[Path], object]:
    """A call that loads ``tmp/name`` with ``fabric.load_raw`` into ``target(model)``."""

    def call(tmp: Path) -> object:
        fabric, model, _ = set_up()
        fabric.load_raw(tmp / name, target(model))
        return None

    return call


def step_without_backward(tmp: Path) -> None:
    _, model, optimizer = set_up(MixedPrecision("16-mixed", "cpu"))
    model(torch.randn(3, 4)).sum().backward()  # not fabric.backward: the loss was not scaled
    optimizer.step()


def step_with_closure(tmp: Path) -> None:
    fabric, model, optimizer = set_up(MixedPrecision("16-mixed", "cpu"))
    fabric.backward(model(torch.randn(3, 4)).sum())
    optimizer.step(lambda: 0.0)


def clip_nan_gradient(tmp: Path) -> None:
    fabric, model, optimizer = set_up()
    fabric.backward(model(torch.randn(3, 4)).sum())
    model.module.layer.weight.grad[0, 0] = float("nan")
    fabric.clip_gradients(model, optimizer, max_norm=1.0, error_if_nonfinite=True)


def setup_module_twice(tmp: Path) -> None:
    fabric = cpu()
    model = Net()
    fabric.setup_module(model)
    fabric.setup_module(model)


def setup_optimizer_twice(tmp: Path) -> None:
    fabric = cpu()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fabric.setup(model, optimizer)
    fabric.setup_optimizers(optimizer)


def launch_without_fabric_argument(tmp: Path) -> None:
    def train() -> None: ...

    cpu().launch(train)


def call_hook_that_is_not_a_method(tmp: Path) -> None:
    class Callback:
        on_train_end = 3

    cpu(callbacks=[Callback()]).call("on_train_end")


def log_vector(tmp: Path) -> None:
    class Recorder:
        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    cpu(loggers=Recorder()).log("loss", torch.ones(3))


def share_strategy_instance(tmp: Path) -> None:
    strategy = SingleDeviceStrategy()
    cpu(strategy=strategy)
    cpu(strategy=strategy, precision="bf16-mixed")


def decreasing_totals(tmp: Path) -> None:
    throughput = Throughput(window_size=2)
    throughput.update(time=1.0, batches=2, samples=8)
    throughput.update(time=2.0, batches=3, samples=4)  # per-step count instead of a running total


def save_into(name: str, state: Callable[[Any, Any], Any], **kwargs: Any) -> Callable[[Path], object]:
    """A call that saves ``state(model, optimizer)`` at ``tmp/name``."""

    def call(tmp: Path) -> object:
        fabric, model, optimizer = set_up()
        return fabric.save(tmp / name, state(model, optimizer), **kwargs)

    return call


def load_from(name: str, state: Callable[[Any, Any], Any], **kwargs: Any) -> Callable[[Path], object]:
    """A call that loads ``tmp/name`` into ``state(model, optimizer)``."""

    def call(tmp: Path) -> object:
        fabric, model, optimizer = set_up(**kwargs)
        return fabric.load(tmp / name, state(model, optimizer))

    return call


def model_only(model: Any, optimizer: Any) -> dict[str, Any]:
    return {"model": model}


# --- the table -------------------------------------------------------------------------------------

TABLE = [
    # Fabric(...) arguments
    pytest.param(
        Misuse(
            lambda tmp: cpu(precision="17-mixed"),
            ValueError,
            r"Fabric\(precision='17-mixed'\)",
            r"Choose one of: '32-true', '64-true', '16-mixed', 'bf16-mixed', '16-true', 'bf16-true'",
        ),
        id="fabric-precision-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Fabric(accelerator="tpu"),
            ValueError,
            r"Fabric\(accelerator='tpu'\)",
            r"Choose one of: 'cpu', 'cuda', 'gpu', 'mps', 'auto'",
        ),
        id="fabric-accelerator-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Fabric(accelerator=3),  # type: ignore[arg-type]
            TypeError,
            r"Fabric\(accelerator=3\) must be a string",
            r"Choose one of: 'cpu', 'cuda'",
        ),
        id="fabric-accelerator-not-a-string",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Fabric(accelerator="cuda"),
            ValueError,
            r"Fabric\(accelerator='cuda'\) cannot run here",
            r"Use accelerator='cpu' or 'auto'.*CUDA_VISIBLE_DEVICES",
        ),
        id="fabric-accelerator-cuda-without-gpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible"),
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=0),
            ValueError,
            r"Fabric\(devices=0\) selects no device",
            r"Pass devices=1 or more",
        ),
        id="fabric-devices-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=-2),
            ValueError,
            r"Fabric\(devices=-2\) is negative",
            r"Pass a positive count, or -1",
        ),
        id="fabric-devices-negative",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=-1),
            ValueError,
            r"Fabric\(devices=-1\) asks for 'every device'.*CPU",
            r"Pass the number of CPU processes, for example devices=2",
        ),
        id="fabric-devices-all-on-cpu",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=1.5),
            TypeError,
            r"Fabric\(devices=1\.5\) has type float",
            r"Pass an int, a list of device indices",
        ),
        id="fabric-devices-float",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices="two"),
            ValueError,
            r"Fabric\(devices='two'\) is not a device count",
            r"Write a count like '2', indices like '0,1', or 'auto'",
        ),
        id="fabric-devices-text",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=[0, 1]),
            ValueError,
            r"Fabric\(devices=\[0, 1\]\) lists device indices.*accelerator='cpu'",
            r"Pass the number of CPU processes instead",
        ),
        id="fabric-devices-indices-on-cpu",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(strategy="horovod"),
            ValueError,
            r"Fabric\(strategy='horovod'\) is not a known strategy",
            r"Choose one of: 'single_device', 'ddp', .*'fsdp'",
        ),
        id="fabric-strategy-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(strategy=3),
            TypeError,
            r"Fabric\(strategy=3\)",
            r"a strategy name such as 'ddp' or a Strategy instance from handloom\.strategies",
        ),
        id="fabric-strategy-wrong-type",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(strategy="dp"),
            ValueError,
            r"Fabric\(strategy='dp'\) needs CUDA devices, but the accelerator is 'cpu'",
            r"Use strategy='ddp'",
        ),
        id="fabric-strategy-dp-on-cpu",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(num_nodes=0),
            ValueError,
            r"Fabric\(num_nodes=0\)",
            r"Pass the number of machines in the job, for example num_nodes=2",
        ),
        id="fabric-num-nodes-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(num_nodes="2"),
            TypeError,
            r"Fabric\(num_nodes='2'\)",
            r"for example num_nodes=2",
        ),
        id="fabric-num-nodes-text",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(loggers="csv"),
            TypeError,
            r"Fabric\(loggers=\.\.\.\) got 'csv' \(type str\), which has no log_metrics",
            r"Pass handloom\.loggers\.CSVLogger / TensorBoardLogger objects",
        ),
        id="fabric-logger-without-log-metrics",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(plugins=[PrecisionPlugin()]),
            TypeError,
            r"Fabric\(plugins=\[PrecisionPlugin\(\.\.\.\)\]\) is not a plugin handloom understands",
            r"Pass a ClusterEnvironment from handloom\.environments; set precision with precision=",
        ),
        id="fabric-plugin-not-an-environment",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(plugins=[LocalEnvironment(), LocalEnvironment()]),
            ValueError,
            r"Fabric\(plugins=\.\.\.\) holds 2 cluster environments",
            r"Pass at most one ClusterEnvironment",
        ),
        id="fabric-plugins-two-environments",
    ),
    pytest.param(
        Misuse(
            call_hook_that_is_not_a_method,
            TypeError,
            r"fabric\.call\('on_train_end'\) found Callback\.on_train_end = 3",
            r"Define it as a method, or set it to None",
        ),
        id="fabric-callback-hook-not-callable",
    ),
    pytest.param(
        Misuse(
            share_strategy_instance,
            RuntimeError,
            r"This SingleDeviceStrategy instance is already in use by another Fabric",
            r"Create a new strategy instance for each Fabric",
        ),
        id="fabric-strategy-instance-shared",
    ),
    pytest.param(
        Misuse(
            with_env({"HANDLOOM_CLI_USED": "1", "HANDLOOM_DEVICES": "2"}, lambda: cpu(devices=4)),
            ValueError,
            r"Fabric\(devices=4\) conflicts with `--devices=2` given to `handloom run`",
            r"Remove the argument from Fabric\(\.\.\.\) or change --devices",
        ),
        id="fabric-devices-contradict-handloom-run",
    ),
    # world sizes that do not fit
    pytest.param(
        Misuse(
            with_env(torchrun_env(world_size=1, rank=0), lambda: cpu(devices=2)),
            ValueError,
            r"Fabric\(devices=2, num_nodes=1\) asks for 2 processes, but the torchelastic launcher started 1",
            r"Make devices x num_nodes equal the launcher's process count \(1\), or leave devices='auto'",
        ),
        id="world-size-devices-vs-launcher",
    ),
    pytest.param(
        Misuse(
            with_env({**torchrun_env(world_size=1, rank=0), "RANK": "1"}, cpu),
            ValueError,
            r"RANK=1 is not below WORLD_SIZE=1",
            r"Start the script with torchrun \(or handloom run\) and do not override the variables",
        ),
        id="world-size-rank-out-of-range",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=2, strategy=ModelParallelStrategy(keep, data_parallel_size=3)),
            ValueError,
            r"ModelParallelStrategy\(data_parallel_size=3, tensor_parallel_size='auto'\)"
            r" does not fit 2 processes",
            r"data_parallel_size x tensor_parallel_size must equal the number of processes",
        ),
        id="world-size-model-parallel-sizes",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(
                devices=2,
                strategy=ModelParallelStrategy(keep, data_parallel_size=2, tensor_parallel_size=2),
            ),
            ValueError,
            r"ModelParallelStrategy\(data_parallel_size=2, tensor_parallel_size=2\) does not fit 2 processes",
            r"must equal the number of processes",
        ),
        id="world-size-model-parallel-2x2-on-2",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(devices=2, strategy=FSDPStrategy(device_mesh=(2, 2))),
            ValueError,
            r"FSDPStrategy\(device_mesh=\(2, 2\)\) describes 4 processes, but the job has 2",
            r"Make replicate x shard equal the number of processes",
        ),
        id="world-size-fsdp-mesh",
    ),
    # strategies' options
    pytest.param(
        Misuse(
            lambda tmp: DDPStrategy(start_method="thread"),
            ValueError,
            r"DDPStrategy\(start_method='thread'\) is not a known start method",
            r"Choose one of: 'popen', 'spawn', 'fork', 'forkserver'",
        ),
        id="ddp-start-method-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: DDPStrategy(timeout=30),  # type: ignore[arg-type]
            TypeError,
            r"DDPStrategy\(timeout=30\) must be a datetime\.timedelta",
            r"for example timedelta\(minutes=10\)",
        ),
        id="ddp-timeout-not-a-timedelta",
    ),
    pytest.param(
        Misuse(
            lambda tmp: DDPStrategy(find_unused=True),
            TypeError,
            r"DDPStrategy\(find_unused=",
            r"find_unused_parameters",
        ),
        id="ddp-unknown-keyword",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(sharding_strategy="FULL"),
            ValueError,
            r"FSDPStrategy\(sharding_strategy='FULL'\) is not a sharding strategy",
            r"Choose one of: 'FULL_SHARD', 'SHARD_GRAD_OP', 'NO_SHARD', 'HYBRID_SHARD'",
        ),
        id="fsdp-sharding-strategy-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(state_dict_type="dcp"),
            ValueError,
            r"FSDPStrategy\(state_dict_type='dcp'\) is not a checkpoint format",
            r"Choose 'sharded' .* or 'full'",
        ),
        id="fsdp-state-dict-type-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(device_mesh=(2,)),  # type: ignore[arg-type]
            ValueError,
            r"FSDPStrategy\(device_mesh=\(2,\)\) must be a \(replicate, shard\) pair",
            r"for example \(2, 4\)",
        ),
        id="fsdp-device-mesh-shape",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(auto_wrap_policy=5),
            TypeError,
            r"FSDPStrategy\(auto_wrap_policy=5\) is neither a set of module classes nor a callable",
            r"auto_wrap_policy=\{nn\.TransformerDecoderLayer\}",
        ),
        id="fsdp-auto-wrap-policy-wrong-type",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(reshard_after_fwd=True),
            TypeError,
            r"FSDPStrategy\(reshard_after_fwd=\.\.\.\) is not an option",
            r"fully_shard takes: .*reshard_after_forward",
        ),
        id="fsdp-unknown-keyword",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(mixed_precision="bf16"),
            TypeError,
            r"FSDPStrategy\(mixed_precision='bf16'\)",
            r"torch\.distributed\.fsdp\.MixedPrecisionPolicy, or None to follow Fabric\(precision=\.\.\.\)",
        ),
        id="fsdp-mixed-precision-wrong-type",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(save_timeout=15),  # type: ignore[arg-type]
            TypeError,
            r"FSDPStrategy\(save_timeout=15\)",
            r"for example timedelta\(seconds=60\)",
        ),
        id="fsdp-save-timeout-not-a-timedelta",
    ),
    pytest.param(
        Misuse(
            lambda tmp: FSDPStrategy(save_timeout=timedelta(seconds=-1)),
            ValueError,
            r"FSDPStrategy\(save_timeout=",
            r"for example timedelta\(seconds=60\)",
        ),
        id="fsdp-save-timeout-negative",
    ),
    pytest.param(
        Misuse(
            lambda tmp: DDPStrategy(save_timeout=0),  # type: ignore[arg-type]
            TypeError,
            r"DDPStrategy\(save_timeout=0\)",
            r"for example timedelta\(seconds=60\)",
        ),
        id="ddp-save-timeout-not-a-timedelta",
    ),
    pytest.param(
        Misuse(
            lambda tmp: ModelParallelStrategy(keep, tensor_parallel_size=0),
            ValueError,
            r"ModelParallelStrategy\(tensor_parallel_size=0\)",
            r"must be a positive integer or 'auto'",
        ),
        id="model-parallel-size-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: ModelParallelStrategy(None),  # type: ignore[arg-type]
            TypeError,
            r"ModelParallelStrategy\(parallelize_fn=None\)",
            r"must be a function `\(model, device_mesh\) -> model`",
        ),
        id="model-parallel-fn-not-callable",
    ),
    # call order
    pytest.param(
        Misuse(
            lambda tmp: not_launched().setup(Net()),
            RuntimeError,
            r"Fabric\(strategy='ddp_spawn', devices=2\) runs several processes, which have not been started",
            r"Call fabric\.launch\(\) \(or fabric\.launch\(fn\)\) before this",
        ),
        id="order-setup-before-launch",
    ),
    pytest.param(
        Misuse(
            lambda tmp: not_launched().all_reduce(torch.tensor(1.0)),
            RuntimeError,
            r"Fabric\(strategy='ddp_spawn', devices=2\)",
            r"Call fabric\.launch\(\)",
        ),
        id="order-collective-before-launch",
    ),
    pytest.param(
        Misuse(
            lambda tmp: ThroughputMonitor(not_launched()),
            RuntimeError,
            r"Fabric\(strategy='ddp_spawn', devices=2\)",
            r"Call fabric\.launch\(\)",
        ),
        id="order-throughput-monitor-before-launch",
    ),
    pytest.param(
        Misuse(
            lambda tmp: not_launched().save(tmp / "model.ckpt", {"step": 4}),
            RuntimeError,
            r"The 'ddp_spawn' strategy is not running yet",
            r"Call fabric\.launch\(\) first",
            prepare=save_checkpoint,
        ),
        id="order-save-before-launch",
    ),
    pytest.param(
        Misuse(
            lambda tmp: not_launched().launch(),
            TypeError,
            r"Fabric\(strategy='ddp_spawn'\) starts a function in each new process",
            r"call fabric\.launch\(train\) where train\(fabric, \.\.\.\)",
        ),
        id="order-launch-without-function-under-spawn",
    ),
    pytest.param(
        Misuse(
            step_without_backward,
            RuntimeError,
            r"optimizer\.step\(\) was called without fabric\.backward\(loss\).*precision='16-mixed'",
            r"replace loss\.backward\(\) with fabric\.backward\(loss\)",
        ),
        id="order-step-without-fabric-backward-16-mixed",
    ),
    pytest.param(
        Misuse(
            step_with_closure,
            TypeError,
            r"optimizer\.step\(closure\) cannot be used with precision='16-mixed'",
            r"Use precision='bf16-mixed' or '32-true'",
        ),
        id="order-step-closure-16-mixed",
    ),
    pytest.param(
        Misuse(
            setup_module_twice,
            ValueError,
            r"fabric\.setup\(Net\) got a model that is already set up",
            r"keep using the object setup returned",
        ),
        id="order-setup-module-twice",
    ),
    pytest.param(
        Misuse(
            setup_optimizer_twice,
            ValueError,
            r"fabric\.setup\(\.\.\., SGD\) got an optimizer that is already set up",
            r"Set up each optimizer once",
        ),
        id="order-setup-optimizer-twice",
    ),
    # wrong objects
    pytest.param(
        Misuse(
            lambda tmp: cpu().setup("model"),
            TypeError,
            r"fabric\.setup\('model'\) needs a torch\.nn\.Module as its first argument, got type str",
            r"model, optimizer = fabric\.setup\(model, optimizer\)",
        ),
        id="object-setup-of-a-string",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().setup(Net(), "adam"),
            TypeError,
            r"got 'adam' \(type str\)",
            r"torch\.optim\.AdamW\(model\.parameters\(\)\); pass an LR scheduler as"
            r" fabric\.setup\(\.\.\., scheduler=scheduler\)",
        ),
        id="object-setup-optimizer-a-string",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().setup_optimizers(Net()),
            TypeError,
            r"got Net\(\.\.\.\) \(type Net\)",
            r"Pass torch\.optim\.Optimizer instances",
        ),
        id="object-setup-optimizers-of-a-model",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().setup_optimizers(),
            ValueError,
            r"fabric\.setup_optimizers\(\) got no optimizer",
            r"Pass at least one",
        ),
        id="object-setup-optimizers-of-nothing",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().setup_dataloaders(TensorDataset(torch.zeros(4, 2))),
            TypeError,
            r"needs torch\.utils\.data\.DataLoader objects, got TensorDataset",
            r"Wrap your data in a DataLoader first",
        ),
        id="object-setup-dataloaders-of-a-dataset",
    ),
    pytest.param(
        Misuse(
            clip_the_plain_model,
            TypeError,
            r"fabric\.clip_gradients\(\) needs the model returned by fabric\.setup\(\), got Net",
            r"model, optimizer = fabric\.setup\(model, optimizer\)",
        ),
        id="object-clip-gradients-of-the-plain-model",
    ),
    pytest.param(
        Misuse(
            clip_by_value_and_norm,
            ValueError,
            r"fabric\.clip_gradients\(clip_val=1\.0, max_norm=1\.0\) needs exactly one of them",
            r"Pass clip_val=\.\.\. to clip each value, or max_norm=\.\.\.",
        ),
        id="object-clip-gradients-both-limits",
    ),
    pytest.param(
        Misuse(
            clip_nan_gradient,
            RuntimeError,
            r"\bnan\b",
            r"error_if_nonfinite=False",
        ),
        id="object-clip-gradients-nan-error-if-nonfinite",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().no_backward_sync(Net()),
            TypeError,
            r"fabric\.no_backward_sync\(\) needs the model returned by fabric\.setup\(\), got Net",
            r"Set it up first",
        ),
        id="object-no-backward-sync-of-a-plain-model",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().all_reduce(torch.tensor(1.0), reduce_op="median"),
            ValueError,
            r"all_reduce\(reduce_op='median'\) is not a known reduction",
            r"Choose one of: 'sum', 'mean', 'max', 'min', 'product'",
        ),
        id="object-all-reduce-unknown-op",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().launch("train.py"),
            TypeError,
            r"fabric\.launch\('train\.py'\) needs a function",
            r"def train\(fabric\)",
        ),
        id="object-launch-of-a-script-name",
    ),
    pytest.param(
        Misuse(
            launch_without_fabric_argument,
            TypeError,
            r"fabric\.launch\(train\) must accept the Fabric object as its first argument",
            r"def train\(fabric, \.\.\.\)",
        ),
        id="object-launch-function-without-fabric",
    ),
    pytest.param(
        Misuse(
            lambda tmp: set_up()[1].mark_forward_method("sample"),
            AttributeError,
            r"mark_forward_method\('sample'\): Net has no method 'sample'",
            r"Check the spelling, or define sample\(\) on Net",
        ),
        id="object-mark-forward-method-missing",
    ),
    # saving: nothing already saved may change
    pytest.param(
        Misuse(
            save_into("model.ckpt", lambda model, optimizer: model),
            TypeError,
            r"fabric\.save\(path, state\) needs a dict for state, got _FabricModule",
            r'for example \{"model": model, "optimizer": optimizer\}',
            prepare=save_checkpoint,
        ),
        id="save-state-not-a-dict",
    ),
    pytest.param(
        Misuse(
            save_into("model.ckpt", model_only, filter=lambda name, value: True),
            TypeError,
            r"fabric\.save\(filter=<function",
            r"must be a dict mapping state keys to functions",
            prepare=save_checkpoint,
        ),
        id="save-filter-not-a-dict",
    ),
    pytest.param(
        Misuse(
            save_into("model.ckpt", model_only, filter={"optimizer": lambda name, value: True}),
            ValueError,
            r"names the key 'optimizer', which the state does not have",
            r"Use one of: \['model'\]",
            prepare=save_checkpoint,
        ),
        id="save-filter-unknown-key",
    ),
    pytest.param(
        Misuse(
            save_into("model.ckpt", lambda model, optimizer: {"model": model, "schedule": lambda s: 0.1}),
            TypeError,
            r"model\.ckpt': state\['schedule'\] holds <function .*which cannot be pickled",
            r"keep other objects out of the state\. The file at that path, if any, is unchanged",
            prepare=save_checkpoint,
        ),
        id="save-unpicklable-value",
    ),
    pytest.param(
        Misuse(
            save_into("notes", model_only),
            IsADirectoryError,
            r"Cannot write the checkpoint file '.*notes': a directory",
            r"Choose another path or remove the directory",
            prepare=directory_of("todo.txt", name="notes"),
        ),
        id="save-over-a-directory",
    ),
    pytest.param(
        Misuse(
            save_into("notes.txt/model.ckpt", model_only),
            NotADirectoryError,
            r"'.*notes\.txt' is a file, not a directory",
            r"Choose a path inside a directory, or move that file away",
            prepare=lambda tmp: (tmp / "notes.txt").write_text("keep me"),
        ),
        id="save-under-a-file",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().save(None, {"step": 1}),  # type: ignore[arg-type]
            TypeError,
            r"fabric\.save\(path=None\) needs a file path",
            r"fabric\.save\('checkpoints/step-100\.ckpt', state\)",
        ),
        id="save-path-none",
    ),
    # loading: missing, damaged or the wrong kind of file
    pytest.param(
        Misuse(
            load_from("missing.ckpt", model_only),
            FileNotFoundError,
            r"No checkpoint file at '.*missing\.ckpt'",
            r"Check the path, or save one first",
            prepare=save_checkpoint,
        ),
        id="load-missing-file",
    ),
    pytest.param(
        Misuse(
            load_from("torn.ckpt", model_only),
            RuntimeError,
            r"Could not read the checkpoint '.*torn\.ckpt': it is not a torch\.save archive",
            r"load another checkpoint",
            prepare=truncated_checkpoint,
        ),
        id="load-truncated-file",
    ),
    pytest.param(
        Misuse(
            load_from("empty.ckpt", model_only),
            RuntimeError,
            r"'.*empty\.ckpt': it is empty",
            r"load another checkpoint",
            prepare=lambda tmp: (tmp / "empty.ckpt").write_bytes(b""),
        ),
        id="load-empty-file",
    ),
    pytest.param(
        Misuse(
            load_from("notes", model_only),
            FileNotFoundError,
            r"'.*notes' is a directory without handloom\.json",
            r"Load another checkpoint",
            prepare=directory_of("todo.txt", name="notes"),
        ),
        id="load-directory-that-is-no-checkpoint",
    ),
    pytest.param(
        Misuse(
            load_from(".model.ckpt.staging", model_only),
            FileNotFoundError,
            r"'.*\.model\.ckpt\.staging' is the staging directory of a sharded save that did not finish",
            r"Load the committed checkpoint beside it",
            prepare=directory_of("__0_0.distcp", name=".model.ckpt.staging"),
        ),
        id="load-staging-directory",
    ),
    pytest.param(
        Misuse(
            load_from("sharded", model_only),
            FileNotFoundError,
            r"'.*sharded' has its handloom\.json but no meta\.pt",
            r"Load an earlier checkpoint",
            prepare=directory_of("handloom.json"),
        ),
        id="load-sharded-directory-without-meta",
    ),
    pytest.param(
        Misuse(
            load_from("custom.ckpt", model_only),
            pickle.UnpicklingError,
            r"'.*custom\.ckpt' holds pickled objects that a safe load refuses \(not allowed: .*Config\)",
            r"torch\.serialization\.add_safe_globals\(\[\.\.\.\]\).*weights_only=False",
            prepare=lambda tmp: torch.save(
                {"model": Net().state_dict(), "config": Config()}, tmp / "custom.ckpt"
            ),
        ),
        id="load-pickled-objects-refused",
    ),
    pytest.param(
        Misuse(
            load_from("tensor.pt", model_only),
            RuntimeError,
            r"'.*tensor\.pt' holds a Tensor, not a dict",
            r"fabric\.load reads files written by fabric\.save or torch\.save\(dict\)",
            prepare=lambda tmp: torch.save(torch.zeros(3), tmp / "tensor.pt"),
        ),
        id="load-file-that-is-no-dict",
    ),
    pytest.param(
        Misuse(
            load_from("weights.pt", model_only),
            KeyError,
            r"no entry 'model': it is a plain state_dict \(it holds 'layer\.bias', 'layer\.weight'\)",
            r"fabric\.load_raw\(path, model\)",
            prepare=lambda tmp: torch.save(Net().state_dict(), tmp / "weights.pt"),
        ),
        id="load-plain-state-dict-with-load",
    ),
    pytest.param(
        Misuse(
            load_from("model.ckpt", lambda model, optimizer: {"model": model, "ema": model}),
            KeyError,
            r"The checkpoint has no entry 'ema' \(it holds \['model', 'optimizer', 'step'\]\)",
            r"Remove the key from the state you load, or pass strict=False",
            prepare=save_checkpoint,
        ),
        id="load-key-the-checkpoint-lacks",
    ),
    pytest.param(
        Misuse(
            load_from("model.ckpt", lambda model, optimizer: {"step": RandomState()}),
            ValueError,
            r"fabric\.load\('.*model\.ckpt', \{'step': RandomState\(\)\}\): the checkpoint's entry 'step'"
            r" is of type int",
            r"leave 'step' out of the state",
            prepare=save_checkpoint,
        ),
        id="load-random-state-from-another-entry",
    ),
    pytest.param(
        Misuse(
            load_from("model.ckpt", model_only, width=8),
            RuntimeError,
            r"entry 'model' does not fit the Net under 'model'.*size mismatch for layer\.weight",
            r"Load it into a model built like the one that saved it",
            prepare=save_checkpoint,
        ),
        id="load-checkpoint-of-another-model-size",
    ),
    pytest.param(
        Misuse(
            load_from("model.ckpt", lambda model, optimizer: [model, optimizer]),
            TypeError,
            r"fabric\.load\(path, state\) needs a dict for state .*got type list",
            r'for example \{"model": model, "optimizer": optimizer\}',
            prepare=save_checkpoint,
        ),
        id="load-state-not-a-dict",
    ),
    pytest.param(
        Misuse(
            load_raw_from("weights.pt", lambda model: model),
            FileNotFoundError,
            r"No checkpoint file at '.*weights\.pt'",
            r"Check the path",
            prepare=save_checkpoint,
        ),
        id="load-raw-missing-file",
    ),
    pytest.param(
        Misuse(
            load_raw_from("model.ckpt", lambda model: model),
            ValueError,
            r"fabric\.load_raw\('.*model\.ckpt'",
            r"fabric\.load\(",
            prepare=save_checkpoint,
        ),
        id="load-raw-of-a-fabric-checkpoint",
    ),
    pytest.param(
        Misuse(
            load_raw_from("weights.pt", lambda model: {"model": model}),
            TypeError,
            r"got type dict",
            r"fabric\.load\(path, state\)",
            prepare=lambda tmp: torch.save(Net().state_dict(), tmp / "weights.pt"),
        ),
        id="load-raw-into-a-dict",
    ),
    # checkpoint helpers
    pytest.param(
        Misuse(
            lambda tmp: CheckpointFolder(tmp, keep_last=0),
            ValueError,
            r"CheckpointFolder\(keep_last=0\)",
            r"must be an int >= 1 .*or None to keep all",
        ),
        id="folder-keep-last-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: CheckpointFolder(tmp, prefix="runs/step-"),
            ValueError,
            r"CheckpointFolder\(prefix='runs/step-'\)",
            r"without path separators or a leading dot, for example 'step-'",
        ),
        id="folder-prefix-with-separator",
    ),
    pytest.param(
        Misuse(
            lambda tmp: CheckpointFolder(tmp).path(-1),
            ValueError,
            r"CheckpointFolder\.path\(step=-1\) needs an int >= 0",
            r"for example folder\.path\(state\['step'\]\)",
        ),
        id="folder-negative-step",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("consolidate", str(tmp / "sharded"), str(tmp / "model.pt")),
            CommandFailed,
            r"Cannot consolidate '.*sharded': nothing is at that path",
            r"Check the path: pass the directory fabric\.save wrote",
            status=2,
        ),
        id="consolidate-missing-directory",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("consolidate", str(tmp / "model.ckpt"), str(tmp / "model.pt")),
            CommandFailed,
            r"Cannot consolidate '.*model\.ckpt': it is a file",
            r"needs no consolidation: torch\.load reads it as it is",
            prepare=save_checkpoint,
            status=2,
        ),
        id="consolidate-a-file",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("consolidate", str(tmp / "sharded"), str(tmp / "model.pt")),
            CommandFailed,
            r"'.*sharded' is a directory without handloom\.json",
            r"Load another checkpoint",
            prepare=directory_of("__0_0.distcp"),
            status=2,
        ),
        id="consolidate-incomplete-directory",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("consolidate", str(tmp / "sharded"), str(tmp / "model.ckpt")),
            CommandFailed,
            r"The output file '.*model\.ckpt' already exists",
            r"replace it with --overwrite",
            prepare=lambda tmp: (directory_of("handloom.json")(tmp), save_checkpoint(tmp)),
            status=2,
        ),
        id="consolidate-onto-an-existing-file",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("consolidate", str(tmp / "sharded"), str(tmp / "model.pt")),
            CommandFailed,
            r"'.*sharded' has its handloom\.json but no meta\.pt",
            r"Load an earlier checkpoint",
            prepare=directory_of("handloom.json"),
            status=2,
        ),
        id="consolidate-damaged-checkpoint",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom(
                "consolidate", str(tmp / "sharded"), str(tmp / "a.pt"), "--output_file", "b.pt"
            ),
            CommandFailed,
            r"OUT_FILE '.*a\.pt' and --output_file 'b\.pt' differ",
            r"give one",
            status=2,
        ),
        id="consolidate-two-output-files",
    ),
    # `handloom run` flags
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--devices", "0"),
            CommandFailed,
            r"--devices 0 asks for no devices",
            r"Give a positive number such as 1 or 2, or 'auto'",
            prepare=write_script,
            status=2,
        ),
        id="run-devices-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--devices", "two"),
            CommandFailed,
            r"--devices 'two' is not a device count",
            r"Give a positive number such as 2, 'auto' or -1 for every GPU, or GPU indices like '0,1'",
            prepare=write_script,
            status=2,
        ),
        id="run-devices-text",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--precision", "17-mixed"),
            CommandFailed,
            r"argument --precision: invalid choice: '17-mixed'",
            r"choose from '32-true', '64-true', '16-mixed', 'bf16-mixed'",
            prepare=write_script,
            status=2,
        ),
        id="run-precision-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--strategy", "horovod"),
            CommandFailed,
            r"argument --strategy: invalid choice: 'horovod'",
            r"choose from 'auto', 'ddp', 'ddp_find_unused_parameters_true', 'dp', 'fsdp'",
            prepare=write_script,
            status=2,
        ),
        id="run-strategy-unknown",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--strategy", "deepspeed_stage_2_offload"),
            CommandFailed,
            r"argument --strategy: --strategy deepspeed_stage_2_offload cannot run: handloom has no",
            r"use strategy=FSDPStrategy\(sharding_strategy='SHARD_GRAD_OP', cpu_offload=True\)",
            prepare=write_script,
            status=2,
        ),
        id="run-strategy-deepspeed",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--num-nodes", "0"),
            CommandFailed,
            r"--num-nodes '0' cannot work",
            r"Give --num-nodes 1 or more, or MIN:MAX such as 1:4",
            prepare=write_script,
            status=2,
        ),
        id="run-num-nodes-zero",
    ),
    pytest.param(
        Misuse(
            lambda tmp: handloom("run", str(tmp / "tain.py")),
            CommandFailed,
            r"handloom run .*tain\.py: there is no file at",
            r"Pass the path of the Python script to launch",
            prepare=write_script,
            status=2,
        ),
        id="run-missing-script",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--num-nodes", "2", "--node-rank", "2"),
            CommandFailed,
            r"--node-rank 2 is out of range for 2 node\(s\)",
            r"ranks run from 0 to 1\. Give each node its own rank in that range",
            prepare=write_script,
            status=2,
        ),
        id="run-node-rank-out-of-range",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--main-port", "70000"),
            CommandFailed,
            r"--main-port 70000 is not a TCP port",
            r"Give a free port between 1 and 65535",
            prepare=write_script,
            status=2,
        ),
        id="run-main-port-out-of-range",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--max-restarts", "-1"),
            CommandFailed,
            r"--max-restarts -1 is negative",
            r"Give 0 \(no restarts\) or a positive count",
            prepare=write_script,
            status=2,
        ),
        id="run-max-restarts-negative",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--standalone", "--num-nodes", "2"),
            CommandFailed,
            r"--standalone --num-nodes 2 cannot work",
            r"Drop --standalone and give --main-address, or --rdzv-backend and --rdzv-endpoint",
            prepare=write_script,
            status=2,
        ),
        id="run-standalone-with-several-nodes",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--accelerator", "cpu", "--devices", "0,1"),
            CommandFailed,
            r"--accelerator cpu --devices '0,1' lists device indices",
            r"Give a process count such as --devices 2",
            prepare=write_script,
            status=2,
        ),
        id="run-device-indices-on-cpu",
    ),
    pytest.param(
        Misuse(
            lambda tmp: run_in(tmp, "--gpus", "2"),
            CommandFailed,
            r"unrecognized arguments: --gpus",
            r"handloom run --help",
            prepare=write_script,
            status=2,
        ),
        id="run-unknown-flag",
    ),
    # loggers and utilities
    pytest.param(
        Misuse(
            log_vector,
            ValueError,
            r"fabric\.log / fabric\.log_dict got a tensor of shape \(3,\) for 'loss'",
            r"Log a reduction such as loss\.mean\(\), or one key per element",
        ),
        id="log-multi-element-tensor",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu(loggers=CSVLogger(tmp / "logs")).log("loss", "high"),
            TypeError,
            r"CSVLogger\.log_metrics got str for 'loss'",
            r"Log a number, or record other objects with the writer itself",
        ),
        id="log-a-string",
    ),
    pytest.param(
        Misuse(
            lambda tmp: cpu().logger,
            RuntimeError,
            r"fabric\.logger is undefined: no logger was given",
            r"Fabric\(loggers=CSVLogger\('logs'\)\)",
        ),
        id="logger-without-loggers",
    ),
    pytest.param(
        Misuse(
            lambda tmp: CSVLogger(tmp / "logs", flush_logs_every_n_steps=0),
            ValueError,
            r"CSVLogger\(flush_logs_every_n_steps=0\)",
            r"must be at least 1 \(1 writes every row at once\)",
        ),
        id="csv-logger-flush-zero",
    ),
    pytest.param(
        Misuse(
            decreasing_totals,
            ValueError,
            r"Throughput\.update\(samples=4\) is smaller than the samples=8 of the previous update",
            r"update\(\) takes running totals since the start.*call reset\(\)",
        ),
        id="throughput-decreasing-totals",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Throughput().update(time=1.0, batches=4, samples=2),
            ValueError,
            r"Throughput\.update\(batches=4, samples=2\) counts fewer samples than batches",
            r"Pass the number of samples \(batches times the batch size\)",
        ),
        id="throughput-samples-fewer-than-batches",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Throughput(window_size=1),
            ValueError,
            r"Throughput\(window_size=1\)",
            r"Pass window_size=2 or more",
        ),
        id="throughput-window-of-one",
    ),
    pytest.param(
        Misuse(
            lambda tmp: Throughput(world_size=0),
            ValueError,
            r"Throughput\(world_size=0\) must be at least 1",
            r"Pass world_size=fabric\.world_size",
        ),
        id="throughput-world-size-zero",
    ),
]


# --- the checks ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, str] | None]:
    """Every path under ``root``: a file as (size, mtime, SHA-256 of its bytes), a directory as None."""
    found: dict[str, tuple[int, int, str] | None] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_dir():
            found[name] = None
        else:
            stat = path.stat()
            found[name] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def message_of(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])  # str(KeyError) is the repr of its message
    return str(error)


@pytest.mark.parametrize("row", TABLE)
def test_misuse_is_refused_with_a_message_that_quotes_it_and_says_what_to_do(
    row: Misuse, tmp_path: Path
) -> None:
    if row.prepare is not None:
        row.prepare(tmp_path)
        assert any(path.is_file() for path in tmp_path.rglob("*")), "prepare wrote nothing to protect"
    before = snapshot(tmp_path)

    with pytest.raises(row.error) as raised:
        row.call(tmp_path)

    message = message_of(raised.value)
    assert re.search(row.quotes, message, re.DOTALL), f"does not quote the misuse: {message}"
    assert re.search(row.fix, message, re.DOTALL), f"does not say what to do: {message}"
    if row.status is not None:
        assert isinstance(raised.value, CommandFailed) and raised.value.status == row.status
    assert not message.startswith("Error") and not re.search(r"\w!(\s|$)", message)  # house style
    assert snapshot(tmp_path) == before, "the failed call changed what was saved"


def test_the_table_has_forty_rows_with_unique_ids() -> None:
    ids = [row.id for row in TABLE]
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]
    expected_to_pass = [row for row in TABLE if not any(mark.name == "xfail" for mark in row.marks)]
    assert len(expected_to_pass) >= 40
    assert all(isinstance(row.values[0], Misuse) for row in TABLE)
