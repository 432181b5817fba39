"""Lightning's accelerators and strategies surface: accelerator objects, strategies built on their own
with Lightning's constructor arguments, the registries, DeepSpeed/XLA refusals, and the set-up
module's ``.device``/``.dtype``."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric
from handloom.accelerators import (
    ACCELERATOR_REGISTRY,
    Accelerator,
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
    XLAAccelerator,
    find_usable_cuda_devices,
)
from handloom.device_dtype import _DeviceDtypeModuleMixin
from handloom.devices import HardwareProbe
from handloom.options import FabricOptions, resolve_plan
from handloom.strategies import (
    STRATEGY_REGISTRY,
    DataParallelStrategy,
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAFSDPStrategy,
    XLAStrategy,
)

CPU = HardwareProbe()
TWO_GPUS = HardwareProbe(cuda_device_count=2)

# Every public name of Lightning 2.6's accelerators and strategies modules, at handloom's path.
LIGHTNING_NAMES = {
    "accelerators": [
        "ACCELERATOR_REGISTRY",
        "Accelerator",
        "CPUAccelerator",
        "CUDAAccelerator",
        "MPSAccelerator",
        "XLAAccelerator",
        "find_usable_cuda_devices",
    ],
    "accelerators.accelerator": ["Accelerator"],
    "accelerators.cpu": ["CPUAccelerator"],
    "accelerators.cuda": [
        "CUDAAccelerator",
        "find_usable_cuda_devices",
        "num_cuda_devices",
        "is_cuda_available",
    ],
    "accelerators.mps": ["MPSAccelerator"],
    "accelerators.xla": ["XLAAccelerator"],
    "accelerators.registry": ["call_register_accelerators"],
    "strategies": [
        "STRATEGY_REGISTRY",
        "DDPStrategy",
        "DataParallelStrategy",
        "DeepSpeedStrategy",
        "FSDPStrategy",
        "ModelParallelStrategy",
        "ParallelStrategy",
        "SingleDeviceStrategy",
        "SingleDeviceXLAStrategy",
        "Strategy",
        "XLAFSDPStrategy",
        "XLAStrategy",
    ],
    "strategies.strategy": ["Strategy", "TBroadcast", "TReduce"],
    "strategies.parallel": ["ParallelStrategy"],
    "strategies.single_device": ["SingleDeviceStrategy"],
    "strategies.ddp": ["DDPStrategy"],
    "strategies.dp": ["DataParallelStrategy"],
    "strategies.fsdp": ["FSDPStrategy"],
    "strategies.model_parallel": ["ModelParallelStrategy"],
    "strategies.deepspeed": ["DeepSpeedStrategy"],
    "strategies.xla": ["XLAStrategy"],
    "strategies.single_xla": ["SingleDeviceXLAStrategy"],
    "strategies.xla_fsdp": ["XLAFSDPStrategy"],
    "strategies.registry": [],
    "strategies.launchers": [],
    "strategies.launchers.launcher": [],
    "strategies.launchers.multiprocessing": [],
    "strategies.launchers.subprocess_script": [],
    "strategies.launchers.xla": [],
}


@pytest.mark.parametrize("module", sorted(LIGHTNING_NAMES))
def test_every_lightning_name_imports_from_the_handloom_path(module: str) -> None:
    imported = importlib.import_module(f"handloom.{module}")
    missing = [name for name in LIGHTNING_NAMES[module] if not hasattr(imported, name)]
    assert not missing, f"handloom.{module} lacks {missing}"


def plan(probe: HardwareProbe = CPU, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    return resolve_plan(FabricOptions(**kwargs), env or {}, probe)


# --- accelerators ------------------------------------------------------------------------------
def test_builtin_accelerators_parse_and_report_devices() -> None:
    assert CPUAccelerator.parse_devices("3") == 3
    assert CPUAccelerator.get_parallel_devices(2) == [torch.device("cpu")] * 2
    assert (CPUAccelerator.auto_device_count(), CPUAccelerator.is_available(), CPUAccelerator.name()) == (
        1,
        True,
        "cpu",
    )
    with pytest.raises(ValueError, match=r"devices=0"):
        CPUAccelerator.parse_devices(0)
    with pytest.raises(ValueError, match="cuda device"):
        CPUAccelerator().setup_device(torch.device("cuda", 0))
    CPUAccelerator().setup_device(torch.device("cpu"))

    assert CUDAAccelerator.is_available() == (torch.cuda.device_count() > 0)
    assert CUDAAccelerator.auto_device_count() == torch.cuda.device_count()
    assert CUDAAccelerator.parse_devices(0) is None  # Lightning's "no GPU"
    assert CUDAAccelerator.get_parallel_devices([1, 3]) == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert MPSAccelerator.get_parallel_devices(1) == [torch.device("mps", 0)]
    assert find_usable_cuda_devices(0) == []
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no visible CUDA device"):
            find_usable_cuda_devices(1)


def test_xla_accelerator_is_unavailable_and_refuses_to_be_built() -> None:
    assert not XLAAccelerator.is_available()
    assert XLAAccelerator.auto_device_count() == 0
    with pytest.raises(RuntimeError, match=r"XLAAccelerator\(\) cannot run.*TPU.*accelerator='cuda'"):
        XLAAccelerator()
    with pytest.raises(ValueError, match=r"Fabric\(accelerator='tpu'\).*TPU.*Choose one of: 'cpu'"):
        Fabric(accelerator="tpu")


def test_accelerator_registry_has_lightnings_api() -> None:
    assert ACCELERATOR_REGISTRY.available_accelerators() == {"cpu", "cuda", "mps", "tpu"}
    assert isinstance(ACCELERATOR_REGISTRY.get("cpu"), CPUAccelerator)
    assert ACCELERATOR_REGISTRY["cuda"]["accelerator"] is CUDAAccelerator
    with pytest.raises(ValueError, match="override=True"):
        ACCELERATOR_REGISTRY.register("cpu", CPUAccelerator)
    with pytest.raises(KeyError, match=r"'npu' is not a registered accelerator.*cpu, cuda"):
        ACCELERATOR_REGISTRY.get("npu")


class RecordingAccelerator(Accelerator):
    """A user's accelerator written for Lightning: CPU processes, and a record of set-up calls."""

    def __init__(self) -> None:
        self.set_up: list[torch.device] = []

    def setup_device(self, device: torch.device) -> None:
        self.set_up.append(device)

    def teardown(self) -> None:
        pass

    @staticmethod
    def parse_devices(devices: Any) -> int:
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("cpu")] * devices

    @staticmethod
    def auto_device_count() -> int:
        return 3

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def name() -> str:
        return "recording"


def test_fabric_accelerator_is_the_accelerator_object_in_use() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    assert isinstance(fabric.accelerator, CPUAccelerator)
    assert fabric.strategy.accelerator is fabric.accelerator
    assert fabric.accelerator.auto_device_count() == 1  # what litgpt asks
    given = CPUAccelerator()
    fabric = Fabric(accelerator=given, devices=2, strategy="ddp_spawn")
    assert fabric.accelerator is given
    assert fabric.world_size == 2


def test_a_custom_accelerator_chooses_the_devices_and_prepares_them() -> None:
    assert plan(accelerator=RecordingAccelerator()).device_indices == (0, 1, 2)  # its auto count
    accelerator = RecordingAccelerator()
    fabric = Fabric(accelerator=accelerator, devices=1)
    assert fabric.accelerator is accelerator
    model = fabric.setup(nn.Linear(2, 2))
    assert accelerator.set_up == [torch.device("cpu")]  # called once, in the process, before use
    assert model.device == torch.device("cpu")


def test_a_custom_accelerator_must_give_devices_handloom_runs_on() -> None:
    class XPUAccelerator(RecordingAccelerator):
        @staticmethod
        def get_parallel_devices(devices: Any) -> list[torch.device]:
            return [torch.device("xpu", 0)]

    class Missing(RecordingAccelerator):
        @staticmethod
        def is_available() -> bool:
            return False

    with pytest.raises(ValueError, match=r"Fabric\(accelerator=XPUAccelerator\(\)\) gives xpu devices"):
        plan(accelerator=XPUAccelerator(), devices=1)
    with pytest.raises(ValueError, match=r"Fabric\(accelerator=Missing\(\)\) cannot run here"):
        plan(accelerator=Missing(), devices=1)
    with pytest.raises(TypeError, match=r"Fabric\(accelerator=3\) must be a string or an Accelerator"):
        plan(accelerator=3)


def test_cli_accelerator_agrees_with_an_accelerator_instance() -> None:
    given = CPUAccelerator()
    env = {"HANDLOOM_CLI_USED": "1", "HANDLOOM_ACCELERATOR": "cpu"}
    assert plan(env=env, accelerator=given).accelerator_object is given
    with pytest.raises(ValueError, match="conflicts with `--accelerator=cuda`"):
        plan(env={**env, "HANDLOOM_ACCELERATOR": "cuda"}, accelerator=given)


# --- strategies on their own ---------------------------------------------------------------------
def test_single_device_strategy_works_before_any_fabric() -> None:
    strategy = SingleDeviceStrategy(device="meta")
    assert strategy.root_device == torch.device("meta")
    assert SingleDeviceStrategy(device=torch.device("cpu")).root_device == torch.device("cpu")
    assert SingleDeviceStrategy().root_device == torch.device("cpu")
    module = nn.Linear(2, 2)
    strategy.module_to_device(module)
    assert module.weight.device.type == "meta"
    batch = strategy.batch_to_device({"x": torch.ones(2), "y": [torch.zeros(1)], "n": 3})
    assert batch["x"].device.type == "meta" and batch["y"][0].device.type == "meta" and batch["n"] == 3
    assert strategy.is_global_zero and strategy.world_size == 1 and strategy.global_rank == 0
    assert strategy.accelerator is None
    accelerator = CPUAccelerator()
    assert SingleDeviceStrategy(device="cpu", accelerator=accelerator).accelerator is accelerator
    with pytest.raises(TypeError, match=r"SingleDeviceStrategy\(accelerator='cpu'\) must be an Accelerator"):
        SingleDeviceStrategy(accelerator="cpu")  # type: ignore[arg-type]


def test_constructor_precision_plugin_is_the_strategys_precision() -> None:
    from handloom.plugins.precision import HalfPrecision

    plugin = HalfPrecision("bf16-true")
    strategy = SingleDeviceStrategy(device="cpu", precision=plugin)
    assert strategy.precision is plugin
    fabric = Fabric(strategy=strategy)
    assert fabric.setup(nn.Linear(2, 2)).weight.dtype == torch.bfloat16


def test_ddp_strategy_takes_lightnings_constructor_arguments() -> None:
    devices = [torch.device("cpu")] * 3
    strategy = DDPStrategy(parallel_devices=devices, start_method="spawn", find_unused_parameters=True)
    assert strategy.root_device == torch.device("cpu")
    assert strategy.num_processes == 3
    assert strategy.ddp_kwargs == {"find_unused_parameters": True}
    fabric = Fabric(strategy=strategy)  # the devices fix accelerator and process count
    assert isinstance(fabric.accelerator, CPUAccelerator)
    assert fabric.world_size == 3
    assert fabric.strategy.distributed_sampler_kwargs == {"num_replicas": 3, "rank": 0}
    assert isinstance(DDPStrategy(), ParallelStrategy)


def test_strategy_devices_decide_the_accelerator_and_indices() -> None:
    cuda = [torch.device("cuda", 1), torch.device("cuda", 0)]
    result = plan(TWO_GPUS, strategy=DDPStrategy(parallel_devices=cuda))
    assert (result.accelerator, result.device_indices) == ("cuda", (1, 0))
    result = plan(TWO_GPUS, strategy=SingleDeviceStrategy(device="cuda:1"))
    assert (result.accelerator, result.device_indices) == ("cuda", (1,))
    assert isinstance(result.accelerator_object, CUDAAccelerator)
    result = plan(TWO_GPUS, strategy=DataParallelStrategy(parallel_devices=cuda), accelerator="gpu")
    assert result.device_indices == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"accelerator": "cpu", "strategy": DDPStrategy(parallel_devices=[torch.device("cuda", 0)] * 1)},
            ValueError,
            r"Fabric\(accelerator='cpu'\) conflicts with the cuda devices given to DDPStrategy",
        ),
        (
            {"devices": 4, "strategy": DDPStrategy(parallel_devices=[torch.device("cpu")] * 2)},
            ValueError,
            r"Fabric\(devices=4\) conflicts with the 2 devices given to DDPStrategy.*devices='auto'",
        ),
        (
            {"accelerator": "cpu", "strategy": DDPStrategy(accelerator=CPUAccelerator())},
            ValueError,
            r"Fabric\(accelerator='cpu'\) conflicts with DDPStrategy\(accelerator=CPUAccelerator\(\)\)",
        ),
        (
            {"strategy": SingleDeviceStrategy(device="cuda:5")},
            ValueError,
            r"device index 5",
        ),
    ],
    ids=["device-type", "device-count", "accelerator-twice", "unknown-index"],
)
def test_strategy_arguments_that_contradict_fabrics_are_refused(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        plan(TWO_GPUS, **kwargs)


def test_single_device_strategy_with_a_device_stands_alone_inside_a_launched_job() -> None:
    torchrun = {
        "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }  # fmt: skip
    result = plan(env=torchrun, strategy=SingleDeviceStrategy(device="cpu"))  # as devices=1 does
    assert (result.launch, result.device_indices, result.topology.world_size) == ("none", (0,), 1)


def test_strategy_accelerator_is_used_when_fabric_leaves_it_auto() -> None:
    accelerator = CPUAccelerator()
    fabric = Fabric(strategy=DDPStrategy(accelerator=accelerator, start_method="spawn"), devices=2)
    assert fabric.accelerator is accelerator
    assert fabric.strategy.accelerator is accelerator


def test_strategy_cluster_environment_and_checkpoint_io_are_honoured_or_conflict() -> None:
    from handloom.environments import LocalEnvironment
    from handloom.plugins.io import TorchCheckpointIO

    environment = LocalEnvironment()
    assert plan(strategy=DDPStrategy(cluster_environment=environment)).environment is environment
    with pytest.raises(
        ValueError, match=r"conflicts with\s+DDPStrategy\(cluster_environment=LocalEnvironment"
    ):
        plan(strategy=DDPStrategy(cluster_environment=environment), plugins=[LocalEnvironment()])
    with pytest.raises(ValueError, match=r"conflicts with DDPStrategy\(checkpoint_io=TorchCheckpointIO"):
        plan(strategy=DDPStrategy(checkpoint_io=TorchCheckpointIO()), plugins=[TorchCheckpointIO()])


def test_fsdp_strategy_takes_lightnings_deprecated_activation_checkpointing() -> None:
    with pytest.warns(DeprecationWarning, match=r"activation_checkpointing_policy=\{Linear\}"):
        strategy = FSDPStrategy(activation_checkpointing=nn.Linear)
    policy = strategy.activation_checkpointing_policy
    assert policy is not None
    assert policy.select(nn.Linear(1, 1), 0)
    assert not policy.select(nn.ReLU(), 0)
    with pytest.raises(ValueError, match="sets the same thing twice"):
        FSDPStrategy(activation_checkpointing=[nn.Linear], activation_checkpointing_policy={nn.Linear})


# --- registry ----------------------------------------------------------------------------------------
@pytest.fixture
def registered() -> Iterator[str]:
    STRATEGY_REGISTRY.register(
        "my_ddp", DDPStrategy, description="test", start_method="spawn", find_unused_parameters=True
    )
    yield "my_ddp"
    STRATEGY_REGISTRY.remove("my_ddp")


def test_strategy_registry_has_lightnings_names_and_api(registered: str) -> None:
    lightning = {
        "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true", "dp", "fsdp",
        "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_1_offload",
        "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
        "deepspeed_stage_3_offload_nvme", "xla", "single_xla", "xla_fsdp",
    }  # fmt: skip
    assert lightning <= set(STRATEGY_REGISTRY.available_strategies())
    assert "ddp" in STRATEGY_REGISTRY
    assert STRATEGY_REGISTRY["ddp_spawn"]["init_params"] == {"start_method": "spawn"}
    with pytest.raises(ValueError, match="override=True"):
        STRATEGY_REGISTRY.register(registered, DDPStrategy)
    with pytest.raises(KeyError, match="'nope' is not a registered strategy"):
        STRATEGY_REGISTRY.get("nope")
    # A name registered by the user is a Fabric(strategy=...) choice, built with its parameters.
    fabric = Fabric(accelerator="cpu", devices=2, strategy=registered)
    assert isinstance(fabric.strategy, DDPStrategy)
    assert fabric.strategy.start_method == "spawn"
    assert fabric.strategy.ddp_kwargs == {"find_unused_parameters": True}


# --- DeepSpeed and XLA ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "suggested"),
    [
        ("deepspeed", "FSDPStrategy(sharding_strategy='SHARD_GRAD_OP')"),
        ("deepspeed_stage_1", None),
        ("deepspeed_stage_1_offload", None),
        ("deepspeed_stage_2", "FSDPStrategy(sharding_strategy='SHARD_GRAD_OP')"),
        ("deepspeed_stage_2_offload", "FSDPStrategy(sharding_strategy='SHARD_GRAD_OP', cpu_offload=True)"),
        ("deepspeed_stage_3", "FSDPStrategy(sharding_strategy='FULL_SHARD')"),
        ("deepspeed_stage_3_offload", "FSDPStrategy(sharding_strategy='FULL_SHARD', cpu_offload=True)"),
        ("deepspeed_stage_3_offload_nvme", "FSDPStrategy(sharding_strategy='FULL_SHARD', cpu_offload=True)"),
    ],
)
def test_deepspeed_names_are_refused_with_the_fsdp_or_ddp_call_to_use(
    strategy: str, suggested: str | None
) -> None:
    with pytest.raises(ValueError) as raised:
        Fabric(accelerator="cpu", strategy=strategy)
    message = str(raised.value)
    assert message.startswith(f"Fabric(strategy={strategy!r}) cannot run: handloom has no DeepSpeed engine")
    if suggested is None:
        assert "strategy='ddp'" in message and "optimizer-only sharding" in message
        return
    assert f"strategy={suggested}" in message
    # The suggestion is a real call: it builds the strategy with those options.
    built = eval(suggested, {"FSDPStrategy": FSDPStrategy})
    assert isinstance(built, FSDPStrategy)
    assert built.sharding_strategy in suggested and bool(built.cpu_offload) == ("cpu_offload" in suggested)


def test_deepspeed_strategy_class_takes_lightnings_arguments_and_config() -> None:
    with pytest.raises(
        ValueError, match=r"^DeepSpeedStrategy\(stage=3, offload_parameters=True\) cannot run"
    ):
        DeepSpeedStrategy(stage=3, offload_parameters=True, logging_batch_size_per_gpu=4, pin_memory=True)
    with pytest.raises(ValueError, match=r"^DeepSpeedStrategy\(stage=3\).*'FULL_SHARD'"):
        DeepSpeedStrategy(config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ValueError, match=r"^DeepSpeedStrategy\(stage=0\).*strategy='ddp'"):
        DeepSpeedStrategy(zero_optimization=False)
    assert issubclass(DeepSpeedStrategy, DDPStrategy)


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (XLAStrategy, r"XLAStrategy\(\) cannot run.*strategy='ddp'"),
        (
            lambda: SingleDeviceXLAStrategy(device=0),
            r"SingleDeviceXLAStrategy\(\) cannot run.*SingleDeviceStrategy",
        ),
        (XLAFSDPStrategy, r"XLAFSDPStrategy\(\) cannot run.*strategy='fsdp'"),
        (lambda: Fabric(accelerator="cpu", strategy="xla_fsdp"), r"Fabric\(strategy='xla_fsdp'\) cannot run"),
    ],
)
def test_xla_strategies_are_refused(build: Any, pattern: str) -> None:
    with pytest.raises(RuntimeError, match=pattern):
        build()


def test_unknown_strategy_lists_only_runnable_names() -> None:
    with pytest.raises(ValueError, match=r"'horovod'\) is not a known strategy") as raised:
        Fabric(accelerator="cpu", strategy="horovod")
    choices = re.findall(r"'([a-z_0-9]+)'", str(raised.value).split("Choose one of:")[1])
    assert "ddp" in choices and "fsdp" in choices
    assert not [name for name in choices if "deepspeed" in name or "xla" in name]
    assert issubclass(SingleDeviceXLAStrategy, SingleDeviceStrategy) and issubclass(XLAStrategy, Strategy)


# --- the set-up module's .device and .dtype --------------------------------------------------------
class Inner(_DeviceDtypeModuleMixin):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


def test_setup_module_device_and_dtype_follow_conversions() -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-true")
    model = fabric.setup(nn.Sequential(nn.Linear(2, 2), Inner()))
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.bfloat16)
    model.double()
    assert model.dtype == torch.float64 == model.module[0].weight.dtype
    model.half()
    assert model.dtype == torch.float16
    model.to(torch.float32)
    assert model.dtype == torch.float32
    model.to(device="meta")
    assert model.device == torch.device("meta") == model.module[0].weight.device
    assert model.module[1].device == torch.device("meta")  # the user's own mixin modules follow too
    model.to_empty(device="cpu").cpu()
    assert model.device == torch.device("cpu")
    assert "_device" not in vars(model.module)  # recorded on the wrapper, not written into the model
    with pytest.raises(RuntimeError, match=r"module.to\(torch.float16\)"):
        model.dtype = torch.float16


def test_setup_module_device_without_moving_is_where_the_parameters_are() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = fabric.setup_module(nn.Linear(2, 2, device="meta"), move_to_device=False)
    assert model.device == torch.device("meta")
    assert fabric.setup(nn.Linear(2, 2)).device == fabric.device
