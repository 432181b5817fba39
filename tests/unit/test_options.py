"""The resolver as a truth table: constructor arguments x launch environment x hardware -> plan."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from handloom.devices import HardwareProbe
from handloom.environments import SLURMEnvironment
from handloom.options import FabricOptions, resolve_plan
from handloom.precision import resolve_precision_name
from handloom.strategies import DataParallelStrategy, DDPStrategy, SingleDeviceStrategy

CPU = HardwareProbe()
TWO_GPUS = HardwareProbe(cuda_device_count=2)
NOTEBOOK = HardwareProbe(interactive=True)
TORCHRUN_2 = {
    "TORCHELASTIC_RUN_ID": "x",
    "WORLD_SIZE": "2",
    "RANK": "1",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}
CLI = {**TORCHRUN_2, "HANDLOOM_CLI_USED": "1"}


def plan(env: dict[str, str] | None = None, probe: HardwareProbe = CPU, **kwargs: Any) -> Any:
    return resolve_plan(FabricOptions(**kwargs), env or {}, probe)


@pytest.mark.parametrize(
    ("kwargs", "probe", "accelerator", "devices", "strategy", "launch"),
    [
        ({}, CPU, "cpu", (0,), SingleDeviceStrategy, "none"),
        ({"accelerator": "cpu", "devices": 2}, CPU, "cpu", (0, 1), DDPStrategy, "script"),
        ({"accelerator": "cpu", "devices": "2"}, CPU, "cpu", (0, 1), DDPStrategy, "script"),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"},
            CPU,
            "cpu",
            (0, 1),
            DDPStrategy,
            "spawn",
        ),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork"},
            CPU,
            "cpu",
            (0, 1),
            DDPStrategy,
            "fork",
        ),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "DDP_Notebook"},
            CPU,
            "cpu",
            (0, 1),
            DDPStrategy,
            "fork",
        ),
        ({"accelerator": "cpu", "devices": 2}, NOTEBOOK, "cpu", (0, 1), DDPStrategy, "fork"),
        ({"accelerator": "cpu", "num_nodes": 2}, CPU, "cpu", (0,), DDPStrategy, "script"),
        ({}, TWO_GPUS, "cuda", (0, 1), DDPStrategy, "script"),
        ({"accelerator": "gpu", "devices": 1}, TWO_GPUS, "cuda", (0,), SingleDeviceStrategy, "none"),
        ({"accelerator": "cuda", "devices": [1]}, TWO_GPUS, "cuda", (1,), SingleDeviceStrategy, "none"),
        ({"accelerator": "cuda", "devices": "1,"}, TWO_GPUS, "cuda", (1,), SingleDeviceStrategy, "none"),
        ({"accelerator": "cuda", "devices": -1}, TWO_GPUS, "cuda", (0, 1), DDPStrategy, "script"),
        (
            {"accelerator": "cuda", "devices": 2, "strategy": "dp"},
            TWO_GPUS,
            "cuda",
            (0, 1),
            DataParallelStrategy,
            "none",
        ),
        (
            {"devices": "auto"},
            HardwareProbe(cuda_device_count=2, interactive=True),
            "cuda",
            (0,),
            SingleDeviceStrategy,
            "none",
        ),
        ({}, HardwareProbe(mps_available=True), "mps", (0,), SingleDeviceStrategy, "none"),
    ],
)
def test_truth_table(
    kwargs: dict[str, Any],
    probe: HardwareProbe,
    accelerator: str,
    devices: tuple[int, ...],
    strategy: type,
    launch: str,
) -> None:
    result = plan(probe=probe, **kwargs)
    assert result.accelerator == accelerator
    assert result.device_indices == devices
    assert type(result.strategy) is strategy
    assert result.launch == launch


def test_external_launcher_sets_auto_devices_and_world() -> None:
    result = plan(TORCHRUN_2, accelerator="cpu")
    assert result.launch == "external"
    assert result.device_indices == (0, 1)
    assert isinstance(result.strategy, DDPStrategy)
    assert result.topology.global_rank == 1
    assert result.world_size == 2


def test_external_launcher_rejects_mismatched_devices() -> None:
    with pytest.raises(ValueError, match=r"devices=3.*started 2"):
        plan(TORCHRUN_2, accelerator="cpu", devices=3)


# One process in all, asked for inside a job a launcher started (litgpt's merge_lora on rank 1 of 2):
# a standalone Fabric as under Lightning, rank 0 of one, no process group; on CUDA, device 0.
@pytest.mark.parametrize(
    ("kwargs", "probe", "devices"),
    [
        ({"accelerator": "cpu", "devices": 1}, CPU, (0,)),
        ({"accelerator": "cpu", "devices": "1"}, CPU, (0,)),
        ({"accelerator": "cpu", "devices": 1, "strategy": "single_device"}, CPU, (0,)),
        ({"accelerator": "cpu", "devices": 1, "strategy": SingleDeviceStrategy()}, CPU, (0,)),
        ({"accelerator": "cuda", "devices": 1}, TWO_GPUS, (0,)),
        ({"accelerator": "cuda", "devices": [1]}, TWO_GPUS, (1,)),
    ],
)
def test_one_process_inside_a_launched_job_stands_alone(
    kwargs: dict[str, Any], probe: HardwareProbe, devices: tuple[int, ...]
) -> None:
    result = plan({**TORCHRUN_2, "GROUP_RANK": "1"}, probe=probe, **kwargs)
    assert isinstance(result.strategy, SingleDeviceStrategy) and result.launch == "none"
    assert result.device_indices == devices and result.world_size == 1
    top = result.topology
    assert (top.world_size, top.global_rank, top.local_rank, top.node_rank) == (1, 0, 0, 0)
    assert not top.creates_processes_externally and result.environment.name == "local"


@pytest.mark.parametrize(
    ("env", "kwargs", "words"),
    [
        ({**TORCHRUN_2, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, {"devices": 2}, "asks for 2 processes"),
        (TORCHRUN_2, {"devices": 1, "strategy": "ddp"}, "asks for 1 processes"),
        ({**TORCHRUN_2, "WORLD_SIZE": "4"}, {"devices": 1, "num_nodes": 2}, "asks for 2 processes"),
        # one process per node on two nodes, num_nodes left at 1: "auto" follows the launcher
        ({**TORCHRUN_2, "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, {}, "asks for 1 pro"),
    ],
)
def test_other_counts_inside_a_launched_job_are_refused(
    env: dict[str, str], kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        plan(env, accelerator="cpu", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "probe", "world_size"),
    [
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, CPU, 2),
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork"}, CPU, 2),
        ({"accelerator": "cpu", "devices": 2, "num_nodes": 3}, CPU, 6),
        ({"accelerator": "cpu", "devices": 2, "strategy": "fsdp"}, CPU, 2),
        ({"accelerator": "cuda", "devices": 2, "strategy": "dp"}, TWO_GPUS, 1),  # one process
        ({}, CPU, 1),
    ],
)
def test_strategy_knows_the_planned_world_size(
    kwargs: dict[str, Any], probe: HardwareProbe, world_size: int
) -> None:
    strategy = plan(probe=probe, **kwargs).strategy
    assert not strategy.is_bound
    assert (strategy.world_size, strategy.global_rank, strategy.is_global_zero) == (world_size, 0, True)


@pytest.mark.parametrize(
    ("value", "canonical"),
    [(None, "32-true"), ("32", "32-true"), (32, "32-true"), (64, "64-true"), ("64", "64-true"),
     ("16", "16-mixed"), (16, "16-mixed"), ("bf16", "bf16-mixed"), ("bf16-true", "bf16-true"),
     ("16-true", "16-true")],
)  # fmt: skip
def test_precision_aliases(value: Any, canonical: str) -> None:
    assert resolve_precision_name(value) == canonical
    if canonical != "16-mixed":  # on the CPU, 16-mixed becomes bf16-mixed (tested below)
        assert plan(precision=value).precision.name == canonical


def test_16_mixed_on_cpu_becomes_bf16_mixed_with_a_warning_as_in_lightning() -> None:
    with pytest.warns(UserWarning, match=r"precision='bf16-mixed' is used instead.*MixedPrecision"):
        policy = plan(accelerator="cpu", precision="16-mixed").precision
    assert policy.name == "bf16-mixed"
    assert policy.compute_dtype is torch.bfloat16
    assert not policy.grad_scaling


def test_cli_values_fill_defaults() -> None:
    env = {**CLI, "HANDLOOM_STRATEGY": "ddp", "HANDLOOM_PRECISION": "bf16-mixed", "HANDLOOM_DEVICES": "2"}
    result = plan(env)
    assert result.cli_used and result.precision.name == "bf16-mixed" and result.device_indices == (0, 1)


def test_cli_agreeing_explicit_value_is_fine() -> None:
    env = {**CLI, "HANDLOOM_DEVICES": "2", "HANDLOOM_PRECISION": "bf16-mixed"}
    assert plan(env, devices=2, precision="bf16").world_size == 2


@pytest.mark.parametrize(
    ("env_var", "cli", "kwargs", "words"),
    [
        ("HANDLOOM_DEVICES", "2", {"devices": 4}, ["devices=4", "--devices=2"]),
        (
            "HANDLOOM_PRECISION",
            "bf16-mixed",
            {"precision": "16-mixed"},
            ["precision='16-mixed'", "--precision=bf16-mixed"],
        ),
        ("HANDLOOM_STRATEGY", "ddp", {"strategy": "dp"}, ["strategy='dp'", "--strategy=ddp"]),
        ("HANDLOOM_ACCELERATOR", "cpu", {"accelerator": "cuda"}, ["accelerator='cuda'", "--accelerator=cpu"]),
    ],
)
def test_cli_conflict_names_both_values(
    env_var: str, cli: str, kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        plan({**CLI, env_var: cli}, **kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "probe", "error", "words"),
    [
        ({"precision": "17-mixed"}, CPU, ValueError, ["precision='17-mixed'", "'bf16-mixed'"]),
        ({"precision": True}, CPU, ValueError, ["precision=True"]),
        ({"strategy": "ddp_everything"}, CPU, ValueError, ["strategy='ddp_everything'", "'ddp_spawn'"]),
        ({"strategy": 3}, CPU, TypeError, ["strategy=3"]),
        ({"accelerator": "tpu"}, CPU, ValueError, ["accelerator='tpu'", "'cuda'"]),
        ({"accelerator": "cuda"}, CPU, ValueError, ["accelerator='cuda'", "accelerator='cpu'"]),
        ({"accelerator": "gpu"}, CPU, ValueError, ["accelerator='gpu'"]),
        ({"accelerator": "mps"}, CPU, ValueError, ["accelerator='mps'"]),
        ({"devices": 0}, CPU, ValueError, ["devices=0"]),
        ({"devices": "0"}, CPU, ValueError, ["devices='0'"]),
        ({"devices": []}, TWO_GPUS, ValueError, ["devices=[]"]),
        ({"devices": -3}, CPU, ValueError, ["devices=-3"]),
        ({"accelerator": "cpu", "devices": -1}, CPU, ValueError, ["devices=-1", "CPU"]),
        ({"accelerator": "cpu", "devices": [0, 1]}, CPU, ValueError, ["devices=[0, 1]", "devices=2"]),
        ({"accelerator": "cuda", "devices": 3}, TWO_GPUS, ValueError, ["devices=3", "only 2"]),
        ({"accelerator": "cuda", "devices": [0, 5]}, TWO_GPUS, ValueError, ["devices=[0, 5]", "index 5"]),
        ({"accelerator": "cuda", "devices": [1, 1]}, TWO_GPUS, ValueError, ["devices=[1, 1]", "twice"]),
        ({"devices": 1.5}, CPU, TypeError, ["devices=1.5"]),
        ({"devices": "two"}, CPU, ValueError, ["devices='two'"]),
        ({"num_nodes": 0}, CPU, ValueError, ["num_nodes=0", "at least 1"]),
        ({"num_nodes": -2}, CPU, ValueError, ["num_nodes=-2"]),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "dp"},
            CPU,
            ValueError,
            ["strategy='dp'", "strategy='ddp'"],
        ),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
            NOTEBOOK,
            ValueError,
            ["'ddp'", "ddp_notebook"],
        ),
        (
            {"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork"},
            HardwareProbe(fork_available=False),
            ValueError,
            ["'ddp_fork'", "ddp_spawn"],
        ),
        ({"plugins": [object()]}, CPU, TypeError, ["plugins=[object(...)]"]),
        ({"plugins": [SLURMEnvironment(), SLURMEnvironment()]}, CPU, ValueError, ["2 cluster environments"]),
    ],
)
def test_bad_input_names_the_value(
    kwargs: dict[str, Any], probe: HardwareProbe, error: type, words: list[str]
) -> None:
    with pytest.raises(error) as info:
        plan(probe=probe, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_strategy_instance_is_kept_and_validated() -> None:
    mine = DDPStrategy(static_graph=True, start_method="spawn")
    result = plan(accelerator="cpu", devices=2, strategy=mine)
    assert result.strategy is mine and result.launch == "spawn"
    with pytest.raises(ValueError, match="start_method='thread'"):
        DDPStrategy(start_method="thread")
    with pytest.raises(TypeError, match="timeout=30"):
        DDPStrategy(timeout=30)  # type: ignore[arg-type]


def test_explicit_environment_plugin_wins() -> None:
    env = {
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_NODELIST": "node1",
        "SLURM_JOB_NAME": "train",
    }
    assert plan(env).environment.name == "slurm"
    assert plan(env, plugins=[_Local()]).environment.name == "local"


def _Local() -> Any:
    from handloom.environments import LocalEnvironment

    return LocalEnvironment()


def test_multi_node_without_port_is_an_error_at_launch() -> None:
    from handloom.launcher import spec_from_topology

    result = plan(accelerator="cpu", devices=2, num_nodes=2)
    with pytest.raises(ValueError, match="MASTER_PORT"):
        spec_from_topology(result.topology, result.num_processes, result.num_nodes)
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "12345", "NODE_RANK": "1"}
    result = plan(env, accelerator="cpu", devices=2, num_nodes=2)
    spec = spec_from_topology(result.topology, result.num_processes, result.num_nodes)
    assert (spec.main_address, spec.main_port, spec.node_rank, spec.num_nodes) == ("10.0.0.1", 12345, 1, 2)
