"""Cluster environments with Lightning's API (``handloom.plugins.environments``), in one process.

What programs written for Lightning rely on: the import paths and signatures of
``lightning.fabric.plugins.{environments,io,collectives}``; the Lightning methods of each
environment (``world_size()``, ``main_port``, ``detect()`` without an argument, ...); and a
custom ``ClusterEnvironment`` that implements only Lightning's abstract methods, which Fabric
reads and tells its ranks the way Lightning's strategies do.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from handloom import Fabric
from handloom.devices import HardwareProbe
from handloom.environments import LocalEnvironment, Topology
from handloom.options import FabricOptions, Plan, resolve_plan
from handloom.plugins.environments import (
    ClusterEnvironment,
    KubeflowEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
    XLAEnvironment,
)
from handloom.plugins.environments.lightning import find_free_network_port

CPU = HardwareProbe()
TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "job",
    "WORLD_SIZE": "4",
    "RANK": "3",
    "LOCAL_RANK": "1",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
}
SRUN = {
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NAME": "train",
}
# Every variable a launcher may set, cleared before each test sets its own.
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_", "LSB_", "JSM_", "OMPI_", "MV2_", "PMI_", "MPI_LOCAL")
_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_SERVICE_HOST", "STANDALONE_PORT")  # fmt: skip


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_LAUNCHER_PREFIXES) or name in _LAUNCHER_VARS:
            monkeypatch.delenv(name)


def _plan(env: dict[str, str], **kwargs: Any) -> Plan:
    return resolve_plan(FabricOptions(**kwargs), env, CPU)


def _place(environment: ClusterEnvironment) -> tuple[int, int, int, int]:
    """Lightning's ``(world_size(), global_rank(), local_rank(), node_rank())``."""
    return (
        environment.world_size(),
        environment.global_rank(),
        environment.local_rank(),
        environment.node_rank(),
    )


# --- the surface: Lightning's modules, names and signatures ---------------------------------------

_PLUGIN_MODULES = [
    f"lightning.fabric.plugins.{package}{('.' + module) if module else ''}"
    for package, modules in {
        "environments": ["", "cluster_environment", "kubeflow", "lightning", "lsf", "mpi", "slurm",
                         "torchelastic", "xla"],
        "io": ["", "checkpoint_io", "torch_io", "xla"],
        "collectives": ["", "collective", "single_device", "torch_collective"],
    }.items()
    for module in modules
]  # fmt: skip

# Prints, for each module, the public classes and functions Lightning defines in its plugins, with
# the parameter names of each and of each public method or property.
_DESCRIBE = r"""
import importlib, inspect, json, sys

def params(fn):
    try:
        return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        return None

out = {}
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    found = {}
    for attr, obj in vars(module).items():
        if attr.startswith("_") or not getattr(obj, "__module__", "").startswith("lightning.fabric.plugins"):
            continue
        if inspect.isclass(obj):
            members = {"__init__": params(obj.__init__)}
            for member, value in inspect.getmembers(obj):
                if member.startswith("_"):
                    continue
                members[member] = "property" if isinstance(value, property) else params(value)
            found[attr] = members
        elif inspect.isfunction(obj):
            found[attr] = {"__call__": params(obj)}
    out[name] = found
print(json.dumps(out))
"""


def _params(fn: Any) -> list[str] | None:
    try:
        return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError):
        return None


@pytest.mark.slow  # imports Lightning in a subprocess (several seconds)
def test_lightning_plugin_modules_exist_with_the_same_names_and_signatures() -> None:
    pytest.importorskip("lightning")
    # Lightning is read in another process: importing it here would patch torch.compile for the session.
    done = subprocess.run(
        [sys.executable, "-c", _DESCRIBE, *_PLUGIN_MODULES], capture_output=True, text=True, check=True
    )
    lightning: dict[str, dict[str, dict[str, Any]]] = json.loads(done.stdout)
    missing: list[str] = []
    for module_name, names in lightning.items():
        ours = importlib.import_module(module_name.replace("lightning.fabric", "handloom"))
        for name, members in names.items():
            obj = getattr(ours, name, None)
            if obj is None:
                missing.append(f"{ours.__name__}.{name}")
                continue
            for member, theirs in members.items():
                if member == "__call__":
                    mine: Any = _params(obj)
                else:
                    value = (
                        inspect.getattr_static(obj, member, None) if member != "__init__" else obj.__init__
                    )
                    if value is None:
                        missing.append(f"{ours.__name__}.{name}.{member}")
                        continue
                    mine = "property" if isinstance(value, property) else _params(getattr(obj, member))
                if theirs == "property" or mine == "property":
                    ok = theirs == mine
                else:  # Lightning's parameters, in order, then perhaps more of ours (defaulted)
                    ok = theirs is None or (mine is not None and mine[: len(theirs)] == theirs)
                if not ok:
                    missing.append(f"{ours.__name__}.{name}.{member}: Lightning {theirs}, handloom {mine}")
    assert not missing, "\n".join(missing)


def test_the_plugin_names_are_the_one_implementation() -> None:
    from handloom import environments as envs
    from handloom import plugins

    assert plugins.ClusterEnvironment is envs.ClusterEnvironment is ClusterEnvironment
    assert SLURMEnvironment is envs.SLURMEnvironment and LightningEnvironment is envs.LightningEnvironment
    assert issubclass(LightningEnvironment, LocalEnvironment)


# --- Lightning's methods on handloom's environments ----------------------------------------------


def test_torchelastic_answers_lightnings_methods_from_the_agents_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not TorchElasticEnvironment.detect()
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert TorchElasticEnvironment.detect()
    env = TorchElasticEnvironment()
    assert env.creates_processes_externally
    assert (env.main_address, env.main_port) == ("10.0.0.1", 29400)
    assert _place(env) == (4, 3, 1, 1)
    env.set_world_size(8)  # the launcher fixed them: ignored, as in Lightning
    env.set_global_rank(0)
    assert (env.world_size(), env.global_rank()) == (4, 3)
    env.validate_settings(num_devices=2, num_nodes=2)
    with pytest.raises(ValueError, match=r"devices=4, num_nodes=2\) asks for 8 processes.*started 4"):
        env.validate_settings(num_devices=4, num_nodes=2)


def test_slurm_answers_lightnings_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not SLURMEnvironment.detect() and SLURMEnvironment.job_id() is None
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGTERM)
    assert (env.auto_requeue, env.requeue_signal) == (False, signal.SIGTERM)
    assert env.creates_processes_externally
    assert (env.main_address, env.main_port) == ("gpu07", 15000 + 3456)
    assert _place(env) == (4, 2, 0, 1)
    assert (SLURMEnvironment.job_name(), SLURMEnvironment.job_id()) == ("train", 123456)
    assert SLURMEnvironment.resolve_root_node_address("node[04-07,9],gpu1") == "node04"
    assert SLURMEnvironment.resolve_root_node_address("host3 host1") == "host3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive shell: not srun's tasks, no job id
    assert not SLURMEnvironment.detect() and SLURMEnvironment.job_id() is None


def test_a_subclass_of_a_builtin_environment_overrides_what_it_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A program written for Lightning that subclasses SLURMEnvironment to pick the main host itself.
    from handloom.environments import read_topology

    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)

    class MySlurm(SLURMEnvironment):
        @property
        def main_address(self) -> str:
            return "10.0.0.9"

        def node_rank(self) -> int:
            return 0

    _, topology = read_topology(explicit=MySlurm())
    assert (topology.main_address, topology.node_rank) == ("10.0.0.9", 0)
    _, builtin = read_topology(explicit=SLURMEnvironment())
    assert topology.main_port == builtin.main_port == 15000 + 3456  # not overridden: parsed
    assert (topology.world_size, topology.global_rank, topology.local_rank) == (
        builtin.world_size,
        builtin.global_rank,
        builtin.local_rank,
    )


def test_lsf_mpi_and_kubeflow_answer_lightnings_methods(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rankfile = tmp_path / "rankfile"
    rankfile.write_text("batch\nh1\nh1\nh2\nh2\n")
    for name, value in {"LSB_JOBID": "4321", "LSB_DJOB_RANKFILE": str(rankfile), "JSM_NAMESPACE_SIZE": "4",
                        "JSM_NAMESPACE_RANK": "3", "JSM_NAMESPACE_LOCAL_RANK": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert LSFEnvironment.detect()
    lsf = LSFEnvironment(hostname="h2")
    assert _place(lsf) == (4, 3, 1, 1)
    assert (lsf.main_address, lsf.main_port) == ("h1", 10000 + 321)

    open_mpi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "head", "MASTER_PORT": "2345"}  # fmt: skip
    for name, value in open_mpi.items():
        monkeypatch.setenv(name, value)
    mpi = MPIEnvironment()
    assert _place(mpi) == (4, 2, 0, 1)
    assert (mpi.main_address, mpi.main_port) == ("head", 2345)

    for name, value in {"KUBERNETES_SERVICE_HOST": "k8s", "WORLD_SIZE": "3", "RANK": "2"}.items():
        monkeypatch.setenv(name, value)
    kubeflow = KubeflowEnvironment()
    assert _place(kubeflow) == (3, 2, 0, 2)


def test_lightning_environment_records_ranks_and_picks_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    env = LightningEnvironment()
    assert LightningEnvironment.detect() and not env.creates_processes_externally
    assert _place(env) == (1, 0, 0, 0)
    env.set_world_size(4)
    env.set_global_rank(3)
    assert (env.world_size(), env.global_rank()) == (4, 3)
    assert env.main_address == "127.0.0.1"

    port = env.main_port  # a free port, picked once and exported for the processes started from here
    assert env.main_port == port and os.environ["MASTER_PORT"] == str(port)
    env.teardown()
    assert "MASTER_PORT" not in os.environ

    monkeypatch.setenv("MASTER_PORT", "4444")
    monkeypatch.setenv("NODE_RANK", "2")
    fresh = LightningEnvironment()
    assert (fresh.main_port, fresh.node_rank()) == (4444, 2)
    fresh.teardown()  # it did not set MASTER_PORT, so it leaves it
    assert os.environ["MASTER_PORT"] == "4444"

    monkeypatch.setenv("STANDALONE_PORT", "5555")
    assert find_free_network_port() == 5555
    monkeypatch.setenv("LOCAL_RANK", "1")  # every process started by hand
    assert fresh.creates_processes_externally and fresh.local_rank() == 1


def test_processes_started_by_hand_under_lightning_environment_get_lightnings_ranks() -> None:
    # Node 1 of 2, local rank 1, Fabric(devices=2, num_nodes=2): Lightning's world size and rank.
    env = {"LOCAL_RANK": "1", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    environment = LightningEnvironment()
    plan = _plan(env, accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", plugins=[environment])
    assert plan.launch == "external" and plan.environment is environment
    top = plan.topology
    assert (top.world_size, top.global_rank, top.local_rank, top.node_rank) == (4, 3, 1, 1)
    assert (top.main_address, top.main_port) == ("node0", 29500)
    assert (environment.world_size(), environment.global_rank()) == (4, 3)


@pytest.mark.parametrize(
    "environment", [LocalEnvironment(), LightningEnvironment()], ids=["local", "lightning"]
)
def test_a_worker_of_handloom_run_follows_the_agent_with_an_explicit_default_environment(
    environment: ClusterEnvironment,
) -> None:
    # strategy="ddp" re-runs the script under handloom's torchelastic agent: the re-run must join
    # the job, not launch workers of its own.
    plan = _plan(TORCHRUN, accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", plugins=[environment])
    assert plan.launch == "external" and plan.topology.name == "torchelastic"
    assert (plan.topology.global_rank, plan.topology.agent_store) == (3, False)
    assert (environment.world_size(), environment.global_rank()) == (4, 3)


def test_xla_environment_is_refused_with_the_alternatives() -> None:
    assert XLAEnvironment.detect() is False
    with pytest.raises(NotImplementedError, match=r"XLAEnvironment\(\).*does not support.*SLURM"):
        XLAEnvironment()


# --- an environment written for Lightning ---------------------------------------------------------


class _JobEnvironment(ClusterEnvironment):
    """Lightning's abstract methods only: a job whose scheduler sets JOB_* variables."""

    def __init__(self) -> None:
        self.told: list[tuple[str, int]] = []
        self.validated: list[tuple[int, int]] = []

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ["JOB_HEAD"]

    @property
    def main_port(self) -> int:
        return int(os.environ["JOB_PORT"])

    @staticmethod
    def detect() -> bool:
        return "JOB_RANK" in os.environ

    def world_size(self) -> int:
        return int(os.environ["JOB_SIZE"])

    def set_world_size(self, size: int) -> None:
        self.told.append(("world_size", size))

    def global_rank(self) -> int:
        return int(os.environ["JOB_RANK"])

    def set_global_rank(self, rank: int) -> None:
        self.told.append(("global_rank", rank))

    def local_rank(self) -> int:
        return int(os.environ["JOB_RANK"]) % 2

    def node_rank(self) -> int:
        return int(os.environ["JOB_RANK"]) // 2

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        self.validated.append((num_devices, num_nodes))
        if num_devices != 2:
            raise ValueError(f"This job runs 2 processes per node, not devices={num_devices}.")


def test_an_environment_written_for_lightning_must_implement_its_abstract_methods() -> None:
    class Partial(ClusterEnvironment):
        def world_size(self) -> int:
            return 1

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


def test_an_environment_written_for_lightning_places_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"JOB_HEAD": "head", "JOB_PORT": "2222", "JOB_SIZE": "4", "JOB_RANK": "3"}.items():
        monkeypatch.setenv(name, value)
    environment = _JobEnvironment()
    plan = _plan({}, accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", plugins=[environment])
    assert plan.launch == "external" and plan.environment is environment
    assert plan.topology == Topology(
        name="_JobEnvironment",
        world_size=4,
        global_rank=3,
        local_rank=1,
        node_rank=1,
        local_world_size=None,
        num_nodes=None,
        main_address="head",
        main_port=2222,
        creates_processes_externally=True,
    )
    # As Lightning's strategies do: validate, then world size num_nodes * devices and rank
    # node_rank * devices + local_rank.
    assert environment.validated == [(2, 2)]
    assert environment.told == [("world_size", 4), ("global_rank", 3)]

    with pytest.raises(ValueError, match="not devices=4"):
        _plan({}, accelerator="cpu", devices=4, num_nodes=1, strategy="ddp", plugins=[_JobEnvironment()])
    with pytest.raises(
        ValueError, match=r"devices=2, num_nodes=1\) asks for 2 processes.*_JobEnvironment.*started 4"
    ):
        _plan({}, accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", plugins=[_JobEnvironment()])


@pytest.mark.parametrize(
    ("variables", "error", "words"),
    [
        ({"JOB_SIZE": "2", "JOB_RANK": "2"}, ValueError, r"global_rank\(\) returned 2, which is not below"),
        ({"JOB_SIZE": "0"}, ValueError, r"world_size\(\) returned 0, below 1"),
        ({"JOB_PORT": "70000"}, ValueError, r"main_port returned 70000, which is not a port number"),
    ],
)  # fmt: skip
def test_an_environment_that_reports_an_impossible_place_is_named(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], error: type[Exception], words: str
) -> None:
    base = {"JOB_HEAD": "head", "JOB_PORT": "2222", "JOB_SIZE": "2", "JOB_RANK": "1"}
    for name, value in {**base, **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error, match=f"_JobEnvironment.{words}"):
        _plan({}, accelerator="cpu", devices=2, strategy="ddp", plugins=[_JobEnvironment()])


class _OneProcess(ClusterEnvironment):
    """A Lightning environment for a one-process job that Fabric runs by itself."""

    creates_processes_externally = False  # type: ignore[assignment]

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        raise NotImplementedError  # not needed by one process

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return 1

    def set_world_size(self, size: int) -> None:
        raise AssertionError("a one-process job is not told a world size (Lightning's SingleDeviceStrategy)")

    def global_rank(self) -> int:
        return 0

    def set_global_rank(self, rank: int) -> None:
        raise AssertionError("a one-process job is not told a rank")

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return 0


def test_a_one_process_job_trains_with_an_environment_written_for_lightning(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", plugins=[_OneProcess()])
    fabric.launch()
    assert (fabric.world_size, fabric.global_rank) == (1, 0)
    assert fabric._plan.topology.main_port is None
    torch.manual_seed(0)
    model = fabric.setup(torch.nn.Linear(3, 1))
    before = model.weight.detach().clone()
    fabric.backward(model(torch.ones(2, 3)).sum())
    assert model.weight.grad is not None and torch.equal(model.weight.grad, torch.full((1, 3), 2.0))
    assert fabric.all_reduce(torch.tensor(3.0)).item() == 3.0
    fabric.save(tmp_path / "one.ckpt", {"model": model})
    with torch.no_grad():
        model.weight.zero_()
    fabric.load(tmp_path / "one.ckpt", {"model": model})
    assert torch.equal(model.weight, before)
