"""Cluster environments: detection, topology parsing and error messages, all from plain dicts."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from handloom.environments import (
    ClusterEnvironment,
    KubeflowEnvironment,
    LocalEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    Topology,
    TorchElasticEnvironment,
    discover_main_address_with_mpi,
    expand_hostlist,
    read_topology,
    select_environment,
)

# What each launcher really sets for one process (trimmed of unrelated variables).

# torchrun --nnodes 2 --nproc-per-node 4, node 1, local rank 2.
TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "job-7f3a",
    "LOCAL_RANK": "2",
    "RANK": "6",
    "GROUP_RANK": "1",
    "ROLE_RANK": "6",
    "ROLE_NAME": "default",
    "LOCAL_WORLD_SIZE": "4",
    "WORLD_SIZE": "8",
    "GROUP_WORLD_SIZE": "2",
    "ROLE_WORLD_SIZE": "8",
    "MASTER_ADDR": "node0.cluster",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_USE_AGENT_STORE": "False",
    "OMP_NUM_THREADS": "1",
}

# sbatch --nodes 2 --ntasks-per-node 4 --job-name train; srun python train.py; task 6.
SRUN = {
    "SLURM_JOB_ID": "4812345",
    "SLURM_JOBID": "4812345",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "8",
    "SLURM_NPROCS": "8",
    "SLURM_PROCID": "6",
    "SLURM_LOCALID": "2",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODELIST": "gpu[017-018]",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_STEP_ID": "0",
    "SLURMD_NODENAME": "gpu018",
}

# bsub -nnodes 2; jsrun -n 12 -r 6 (Summit): rank 7 on the second compute node.
RANKFILE = "batch3\n" + "a01n01\n" * 42 + "a01n02\n" * 42
JSRUN = {
    "LSB_JOBID": "1234567",
    "LSB_DJOB_RANKFILE": "/ccs/home/u/.lsbatch/1234567.rankfile",
    "LSB_JOBNAME": "train",
    "JSM_NAMESPACE_SIZE": "12",
    "JSM_NAMESPACE_RANK": "7",
    "JSM_NAMESPACE_LOCAL_RANK": "1",
    "JSM_NAMESPACE_LOCAL_SIZE": "6",
    # jsrun starts Spectrum MPI ranks, so Open MPI's variables are there as well.
    "OMPI_COMM_WORLD_SIZE": "12",
    "OMPI_COMM_WORLD_RANK": "7",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "6",
}

# Open MPI: mpirun -np 8 -npernode 4; rank 5.
OPEN_MPI = {
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_UNIVERSE_SIZE": "8",
    "PMIX_RANK": "5",
    "PMIX_NAMESPACE": "prterun-host-1234@1",
}

# MPICH / Intel MPI (Hydra): mpiexec -n 8 -ppn 4; rank 5.
HYDRA = {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "PMI_FD": "6",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "4",
}

# Kubeflow PyTorchJob with one master and two workers; this is worker 1.
KUBEFLOW = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "HOSTNAME": "mnist-worker-1",
    "MASTER_ADDR": "mnist-master-0",
    "MASTER_PORT": "23456",
    "WORLD_SIZE": "3",
    "RANK": "2",
    "PYTHONUNBUFFERED": "0",
}


def _lsf(hostname: str = "a01n02", rankfile: str = RANKFILE) -> LSFEnvironment:
    files = {JSRUN["LSB_DJOB_RANKFILE"]: rankfile}

    def read_text(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return files[path]

    return LSFEnvironment(hostname=hostname, read_text=read_text)


# --- topology from real launcher variables ---------------------------------------------------


def test_torchrun_topology() -> None:
    assert TorchElasticEnvironment().topology(TORCHRUN) == Topology(
        name="torchelastic",
        world_size=8,
        global_rank=6,
        local_rank=2,
        node_rank=1,
        local_world_size=4,
        num_nodes=2,
        main_address="node0.cluster",
        main_port=29500,
        creates_processes_externally=True,
    )


def test_torchrun_num_nodes_falls_back_to_division_and_to_none() -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != "GROUP_WORLD_SIZE"}
    assert TorchElasticEnvironment().topology(env).num_nodes == 2
    uneven = {**env, "WORLD_SIZE": "7", "RANK": "6"}
    assert TorchElasticEnvironment().topology(uneven).num_nodes is None
    no_local = {k: v for k, v in env.items() if k != "LOCAL_WORLD_SIZE"}
    topology = TorchElasticEnvironment().topology(no_local)
    assert (topology.local_world_size, topology.num_nodes) == (None, None)


def test_srun_topology() -> None:
    assert SLURMEnvironment().topology(SRUN) == Topology(
        name="slurm",
        world_size=8,
        global_rank=6,
        local_rank=2,
        node_rank=1,
        local_world_size=4,
        num_nodes=2,
        main_address="gpu017",
        main_port=15000 + 2345,
        creates_processes_externally=True,
    )


def test_srun_master_variables_override_and_fallbacks() -> None:
    env = {**SRUN, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "12345"}
    topology = SLURMEnvironment().topology(env)
    assert (topology.main_address, topology.main_port) == ("10.0.0.5", 12345)
    # No SLURM_NODELIST: the job's node list; no SLURM_NNODES: the length of that list.
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_NODELIST", "SLURM_NNODES")}
    env["SLURM_JOB_NODELIST"] = "gpu[017-018],cpu3"
    topology = SLURMEnvironment().topology(env)
    assert (topology.main_address, topology.num_nodes) == ("gpu017", 3)
    # A short job id gives a port in the same range.
    assert SLURMEnvironment().topology({**SRUN, "SLURM_JOB_ID": "42"}).main_port == 15042


@pytest.mark.parametrize(
    ("tasks_per_node", "node", "expected"),
    [("4", 1, 4), ("4(x2)", 1, 4), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("3,1", 0, 3)],
)
def test_srun_local_world_size_per_node(tasks_per_node: str, node: int, expected: int) -> None:
    env = {
        **SRUN,
        "SLURM_NODELIST": "n[1-4]",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
    }
    assert SLURMEnvironment().topology(env).local_world_size == expected


def test_srun_step_layout_wins_over_job_request() -> None:
    env = {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3(x2)", "SLURM_NTASKS_PER_NODE": "4"}
    assert SLURMEnvironment().topology(env).local_world_size == 3
    bare = {k: v for k, v in SRUN.items() if "TASKS_PER_NODE" not in k}
    assert SLURMEnvironment().topology(bare).local_world_size is None


def test_jsrun_topology() -> None:
    assert _lsf().topology(JSRUN) == Topology(
        name="lsf",
        world_size=12,
        global_rank=7,
        local_rank=1,
        node_rank=1,
        local_world_size=6,
        num_nodes=2,
        main_address="a01n01",
        main_port=10000 + 567,
        creates_processes_externally=True,
    )


def test_jsrun_reads_a_real_rankfile_and_matches_qualified_hostnames(tmp_path: Path) -> None:
    rankfile = tmp_path / "rankfile"
    rankfile.write_text("login1\nh1\nh1\n\nh2\nh2\nh3\n")
    env = {**JSRUN, "LSB_DJOB_RANKFILE": str(rankfile), "MASTER_PORT": "2222"}
    topology = LSFEnvironment(hostname="h3.summit.olcf.ornl.gov").topology(env)
    assert (topology.node_rank, topology.num_nodes, topology.main_address) == (2, 3, "h1")
    assert topology.main_port == 2222


@pytest.mark.parametrize("env", [OPEN_MPI, HYDRA], ids=["open-mpi", "hydra"])
def test_mpirun_topology(env: dict[str, str]) -> None:
    assert MPIEnvironment().topology(env) == Topology(
        name="mpi",
        world_size=8,
        global_rank=5,
        local_rank=1,
        node_rank=1,
        local_world_size=4,
        num_nodes=2,
        main_address=None,
        main_port=None,
        creates_processes_externally=True,
    )


def test_mpirun_with_master_variables() -> None:
    topology = MPIEnvironment().topology({**OPEN_MPI, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (topology.main_address, topology.main_port) == ("head", 29400)


def test_kubeflow_topology() -> None:
    assert KubeflowEnvironment().topology(KUBEFLOW) == Topology(
        name="kubeflow",
        world_size=3,
        global_rank=2,
        local_rank=0,
        node_rank=2,
        local_world_size=1,
        num_nodes=3,
        main_address="mnist-master-0",
        main_port=23456,
        creates_processes_externally=True,
    )


def test_local_topology_describes_the_launching_process() -> None:
    assert LocalEnvironment().topology({}) == Topology(
        name="local",
        world_size=1,
        global_rank=0,
        local_rank=0,
        node_rank=0,
        local_world_size=None,
        num_nodes=None,
        main_address="127.0.0.1",
        main_port=None,
        creates_processes_externally=False,
    )
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4000", "NODE_RANK": "3", "GROUP_RANK": "5"}
    topology = LocalEnvironment().topology(env)
    assert (topology.main_address, topology.main_port, topology.node_rank) == ("10.1.2.3", 4000, 3)
    assert LocalEnvironment().topology({"GROUP_RANK": "5", "MASTER_PORT": ""}).node_rank == 5
    assert LocalEnvironment().topology({"MASTER_PORT": ""}).main_port is None


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (TORCHRUN, True),
        ({"TORCHELASTIC_RUN_ID": ""}, True),
        ({k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}, False),
        ({}, False),
    ],
)
def test_torchelastic_detect(env: dict[str, str], expected: bool) -> None:
    assert TorchElasticEnvironment.detect(env) is expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (SRUN, True),
        ({"SLURM_NTASKS": "1"}, True),
        ({**SRUN, "SLURM_JOB_NAME": "bash"}, False),
        ({**SRUN, "SLURM_JOB_NAME": "interactive"}, False),
        ({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}, False),
        ({**SRUN, **OPEN_MPI}, False),
        ({**SRUN, **HYDRA}, False),
        ({**SRUN, "MV2_COMM_WORLD_SIZE": "8"}, False),
        # srun --mpi=pmi2 sets PMI_RANK and PMI_SIZE itself.
        ({**SRUN, "PMI_RANK": "6", "PMI_SIZE": "8"}, True),
        ({}, False),
    ],
)
def test_slurm_detect(env: dict[str, str], expected: bool) -> None:
    assert SLURMEnvironment.detect(env) is expected


@pytest.mark.parametrize(
    "missing", ["LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE"]
)
def test_lsf_detect_needs_all_four_variables(missing: str) -> None:
    assert LSFEnvironment.detect(JSRUN)
    assert not LSFEnvironment.detect({k: v for k, v in JSRUN.items() if k != missing})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (OPEN_MPI, True),
        (HYDRA, True),
        ({"MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_SIZE": "4"}, True),
        ({**OPEN_MPI, "OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({**OPEN_MPI, "OMPI_COMM_WORLD_SIZE": "eight"}, True),
        ({"PMI_RANK": "0", "PMI_SIZE": "8"}, False),
        ({"PMIX_RANK": "3"}, False),
        ({}, False),
    ],
)
def test_mpi_detect(env: dict[str, str], expected: bool) -> None:
    assert MPIEnvironment.detect(env) is expected


@pytest.mark.parametrize(
    "missing", ["KUBERNETES_SERVICE_HOST", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"]
)
def test_kubeflow_detect_needs_pod_and_rank_variables(missing: str) -> None:
    assert KubeflowEnvironment.detect(KUBEFLOW)
    assert not KubeflowEnvironment.detect({k: v for k, v in KUBEFLOW.items() if k != missing})
    assert not KubeflowEnvironment.detect({**KUBEFLOW, "TORCHELASTIC_RUN_ID": "x"})


def test_local_always_detects() -> None:
    assert LocalEnvironment.detect({})
    assert LocalEnvironment.detect(SRUN)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (TORCHRUN, TorchElasticEnvironment),
        ({**SRUN, **TORCHRUN}, TorchElasticEnvironment),  # torchrun inside a Slurm job
        ({**KUBEFLOW, **TORCHRUN}, TorchElasticEnvironment),  # torchrun in a PyTorchJob pod
        (SRUN, SLURMEnvironment),
        ({**SRUN, "SLURM_JOB_NAME": "interactive"}, LocalEnvironment),  # salloc shell
        (JSRUN, LSFEnvironment),  # jsrun's Open MPI variables do not make it MPI
        ({**SRUN, **OPEN_MPI}, MPIEnvironment),  # mpirun inside a Slurm allocation
        ({**SRUN, **HYDRA}, MPIEnvironment),
        (OPEN_MPI, MPIEnvironment),
        ({**KUBEFLOW, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, KubeflowEnvironment),
        (KUBEFLOW, KubeflowEnvironment),
        ({"MASTER_ADDR": "a", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "0"}, LocalEnvironment),
        ({}, LocalEnvironment),
    ],
)
def test_detection_order(env: dict[str, str], expected: type[ClusterEnvironment]) -> None:
    assert type(select_environment(env)) is expected


def test_explicit_environment_wins_and_is_type_checked() -> None:
    explicit = SLURMEnvironment(auto_requeue=False)
    assert select_environment(TORCHRUN, explicit) is explicit
    environment, topology = read_topology(SRUN, LocalEnvironment())
    assert isinstance(environment, LocalEnvironment)
    assert (topology.name, topology.world_size, topology.creates_processes_externally) == ("local", 1, False)
    with pytest.raises(TypeError, match=r"'slurm' is a str, not a ClusterEnvironment"):
        select_environment({}, "slurm")  # type: ignore[arg-type]


def test_explicit_environment_outside_its_cluster_names_the_missing_variable() -> None:
    with pytest.raises(ValueError, match=r"SLURM_NTASKS is not set\. srun sets it for every process"):
        read_topology({}, SLURMEnvironment())


def test_read_topology_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANK", "3")
    environment, topology = read_topology()
    assert isinstance(environment, TorchElasticEnvironment)
    assert topology.global_rank == 3


# --- Slurm host lists -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
        ("gpu[3,1].cluster, login", ["gpu3.cluster", "gpu1.cluster", "login"]),
        ("[1-2]x", ["1x", "2x"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist: str, expected: list[str]) -> None:
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize(
    ("hostlist", "reason"),
    [
        ("node[1-3", r"A '\[' is never closed"),
        ("node1-3]", r"A '\]' has no matching '\['"),
        ("node[[1-2]]", "nested"),
        ("node[3-1]", r"The range '3-1' runs backwards"),
        ("node[a-c]", r"'a-c', which is not a number or range"),
        ("node[]", r"'', which is not a number or range"),
    ],
)
def test_expand_hostlist_rejects_malformed_lists(hostlist: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        expand_hostlist(hostlist)


# --- errors name the variable, its value and the fix ------------------------------------------


@pytest.mark.parametrize(
    ("environment", "env", "message"),
    [
        (TorchElasticEnvironment(), {**TORCHRUN, "RANK": "six"}, r"RANK='six' is not a whole number"),
        (TorchElasticEnvironment(), {**TORCHRUN, "RANK": "8"}, r"RANK=8 is not below WORLD_SIZE=8"),
        (TorchElasticEnvironment(), {**TORCHRUN, "LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 is out of range"),
        (TorchElasticEnvironment(), {**TORCHRUN, "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 is out of range"),
        (
            TorchElasticEnvironment(),
            {**TORCHRUN, "LOCAL_RANK": "4"},
            r"LOCAL_RANK=4 is not below LOCAL_WORLD_SIZE=4",
        ),
        (
            TorchElasticEnvironment(),
            {**TORCHRUN, "GROUP_RANK": "2"},
            r"GROUP_RANK=2 is not below GROUP_WORLD_SIZE=2",
        ),
        (
            TorchElasticEnvironment(),
            {**TORCHRUN, "MASTER_PORT": "70000"},
            r"MASTER_PORT='70000' is not a port",
        ),
        (TorchElasticEnvironment(), {**TORCHRUN, "MASTER_ADDR": ""}, r"MASTER_ADDR is not set"),
        (SLURMEnvironment(), {**SRUN, "SLURM_PROCID": "8"}, r"SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
        (SLURMEnvironment(), {**SRUN, "SLURM_NODEID": "2"}, r"SLURM_NODEID=2 is not below SLURM_NNODES=2"),
        (SLURMEnvironment(), {**SRUN, "SLURM_NTASKS": "8.0"}, r"SLURM_NTASKS='8.0' is not a whole number"),
        (
            SLURMEnvironment(),
            {**SRUN, "SLURM_LOCALID": "4"},
            r"SLURM_LOCALID=4 is not below SLURM_STEP_TASKS_PER_NODE\[node 1\]=4",
        ),
        (
            SLURMEnvironment(),
            {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4x2"},
            r"SLURM_STEP_TASKS_PER_NODE='4x2'",
        ),
        (
            SLURMEnvironment(),
            {**SRUN, "SLURM_NODELIST": "gpu[1-"},
            r"SLURM_NODELIST='gpu\[1-' is not a valid Slurm host list",
        ),
        (SLURMEnvironment(), {**SRUN, "SLURM_JOB_ID": "abc"}, r"SLURM_JOB_ID='abc' is not a whole number"),
        (
            _lsf(),
            {**JSRUN, "JSM_NAMESPACE_RANK": "12"},
            r"JSM_NAMESPACE_RANK=12 is not below JSM_NAMESPACE_SIZE=12",
        ),
        (_lsf(), {**JSRUN, "LSB_DJOB_RANKFILE": "/gone"}, r"LSB_DJOB_RANKFILE='/gone' cannot be read"),
        (_lsf(rankfile="batch3\n"), JSRUN, r"lists no compute host after the launch host"),
        (_lsf(hostname="b07n11"), JSRUN, r"'b07n11', is not among the compute hosts .*a01n01, a01n02"),
        (
            _lsf(hostname="x", rankfile="batch\n" + "\n".join(f"h{i}" for i in range(9))),
            JSRUN,
            r"\(h0, h1, h2, h3, h4, \.\.\. \(9 hosts\)\)",
        ),
        (MPIEnvironment(), {**OPEN_MPI, "OMPI_COMM_WORLD_SIZE": "eight"}, r"OMPI_COMM_WORLD_SIZE='eight'"),
        (MPIEnvironment(), {**HYDRA, "PMI_RANK": "9"}, r"PMI_RANK=9 is not below PMI_SIZE=8"),
        (
            MPIEnvironment(),
            {
                **OPEN_MPI,
                "OMPI_COMM_WORLD_SIZE": "6",
                "OMPI_COMM_WORLD_RANK": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            },
            r"OMPI_COMM_WORLD_SIZE=6 is not a multiple of OMPI_COMM_WORLD_LOCAL_SIZE=4.*-npernode",
        ),
        (
            MPIEnvironment(),
            {**OPEN_MPI, "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
            r"OMPI_COMM_WORLD_LOCAL_RANK=2 does not fit OMPI_COMM_WORLD_RANK=5.*--map-by slot",
        ),
        (KubeflowEnvironment(), {**KUBEFLOW, "RANK": "3"}, r"RANK=3 is not below WORLD_SIZE=3"),
        (KubeflowEnvironment(), {**KUBEFLOW, "MASTER_PORT": "http"}, r"MASTER_PORT='http' is not a port"),
        (LocalEnvironment(), {"NODE_RANK": "one"}, r"NODE_RANK='one' is not a whole number"),
        (LocalEnvironment(), {"MASTER_PORT": "0"}, r"MASTER_PORT='0' is not a port number"),
    ],
)
def test_errors_name_variable_and_value(
    environment: ClusterEnvironment, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        environment.topology(env)
    text = str(info.value)
    assert not text.startswith("Error")
    # Three parts: what was found, why it cannot work, what to do.
    assert text.count(". ") >= 2


def test_missing_variable_message_says_what_to_do() -> None:
    env = {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}
    with pytest.raises(ValueError, match=r"SLURM_PROCID is not set") as info:
        SLURMEnvironment().topology(env)
    assert "Start the script with srun" in str(info.value)


# --- options and optional dependencies --------------------------------------------------------


def test_slurm_stores_requeue_options() -> None:
    default = SLURMEnvironment()
    assert default.auto_requeue is True
    assert default.requeue_signal == (None if sys.platform == "win32" else signal.SIGUSR1)
    custom = SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGTERM)
    assert (custom.auto_requeue, custom.requeue_signal) == (False, signal.SIGTERM)
    assert "requeue_signal=<Signals.SIGTERM" in repr(custom)
    assert SLURMEnvironment(requeue_signal=None).requeue_signal is None
    with pytest.raises(TypeError, match=r"requeue_signal=10\) is not a signal"):
        SLURMEnvironment(requeue_signal=10)  # type: ignore[arg-type]


def test_mpi_discovery_without_mpi4py_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"pip install mpi4py"):
        discover_main_address_with_mpi()
