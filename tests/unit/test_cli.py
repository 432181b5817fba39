"""``handloom run``: option translation for torchrun, the workers' environment, errors, and real launches."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from handloom import _env_names, cli

SRC = Path(__file__).resolve().parents[2] / "src"
HANDLOOM_VARS = (_env_names.CLI_USED, *_env_names.CLI_OPTION_VARS.values())


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["run", *argv])


def torchrun_args(*argv: str, num_cuda_devices: int = 0) -> list[str]:
    return cli.build_torchrun_args(parse(*argv), num_cuda_devices)


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hello')\n")
    return str(path)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*HANDLOOM_VARS, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


# --- translation to torchrun ------------------------------------------------------------------------


def test_defaults_launch_one_process_and_leave_the_port_to_torchrun() -> None:
    assert torchrun_args("train.py") == [
        "--nproc-per-node=1",
        "--nnodes=1",
        "--node-rank=0",
        "--master-addr=127.0.0.1",
        "--max-restarts=0",
        "train.py",
    ]


@pytest.mark.parametrize(
    ("dashed", "underscored"),
    [
        (["--num-nodes", "2"], ["--num_nodes", "2"]),
        (["--num-nodes", "2"], ["--nnodes", "2"]),
        (["--num-nodes", "2", "--node-rank", "1"], ["--num_nodes", "2", "--node_rank", "1"]),
        (["--main-address", "10.1.1.1"], ["--main_address", "10.1.1.1"]),
        (["--main-port", "1234"], ["--main_port", "1234"]),
        (["--max-restarts", "3"], ["--max_restarts", "3"]),
        (["--rdzv-backend", "c10d"], ["--rdzv_backend", "c10d"]),
        (["--rdzv-endpoint", "h:1"], ["--rdzv_endpoint", "h:1"]),
        (["--rdzv-id", "job"], ["--rdzv_id", "job"]),
        (["--rdzv-conf", "a=1"], ["--rdzv_conf", "a=1"]),
        (["--monitor-interval", "0.5"], ["--monitor_interval", "0.5"]),
        (["--log-dir", "/tmp/x"], ["--log_dir", "/tmp/x"]),
    ],
)
def test_dash_and_underscore_spellings_are_the_same_option(dashed: list[str], underscored: list[str]) -> None:
    options = {k: v for k, v in vars(parse(*dashed, "train.py")).items() if k != "handler"}
    assert options == {k: v for k, v in vars(parse(*underscored, "train.py")).items() if k != "handler"}
    assert torchrun_args(*dashed, "train.py") != torchrun_args("train.py")


@pytest.mark.parametrize(
    ("options", "num_cuda_devices", "nproc"),
    [
        (["--devices", "4"], 0, 4),
        (["--accelerator", "cpu", "--devices", "3"], 0, 3),
        (["--accelerator", "cpu", "--devices", "auto"], 8, 1),
        (["--accelerator", "mps", "--devices", "auto"], 0, 1),
        (["--accelerator", "mps", "--devices", "-1"], 0, 1),
        (["--accelerator", "cuda", "--devices", "auto"], 8, 8),
        (["--accelerator", "cuda", "--devices", "-1"], 8, 8),
        (["--accelerator", "gpu", "--devices", "-1"], 4, 4),
        (["--accelerator", "gpu", "--devices", "auto"], 0, 1),
        (["--accelerator", "auto", "--devices", "auto"], 2, 2),
        (["--devices", "auto"], 2, 2),
        (["--devices", "auto"], 0, 1),
        (["--devices", "0,1"], 2, 2),
        (["--devices", "1,3,5"], 8, 3),
        (["--devices", "0,"], 2, 1),
        (["--accelerator", "cuda", "--devices", "2,3"], 4, 2),
        (["--strategy", "dp", "--devices", "4"], 4, 1),
        (["--strategy", "dp", "--devices", "auto"], 8, 1),
        (["--strategy", "ddp", "--devices", "auto"], 8, 8),
    ],
)
def test_devices_decide_processes_per_node(options: list[str], num_cuda_devices: int, nproc: int) -> None:
    ns = parse(*options, "train.py")
    assert cli.resolve_num_processes(ns, num_cuda_devices) == nproc
    assert cli.build_torchrun_args(ns, num_cuda_devices)[0] == f"--nproc-per-node={nproc}"


def test_multi_node_static_rendezvous_uses_the_main_node_and_a_fixed_port() -> None:
    args = torchrun_args("--num-nodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1", "train.py")
    assert args == [
        "--nproc-per-node=1",
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29400",
        "--max-restarts=0",
        "train.py",
    ]
    assert "--master-port=5555" in torchrun_args("--num-nodes", "2", "--main-port", "5555", "train.py")
    assert "--master-port=5555" in torchrun_args("--main-port", "5555", "train.py")


def test_elastic_and_rendezvous_options_pass_through() -> None:
    args = torchrun_args(
        "--num-nodes",
        "1:4",
        "--max-restarts",
        "3",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "host:29400",
        "--rdzv-id",
        "job7",
        "--rdzv-conf",
        "timeout=60",
        "--monitor-interval",
        "0.5",
        "--log-dir",
        "/tmp/logs",
        "--redirects",
        "3",
        "--tee",
        "1",
        "train.py",
    )
    # With a rendezvous backend the static-only address, port and rank are left out.
    assert args == [
        "--nproc-per-node=1",
        "--nnodes=1:4",
        "--max-restarts=3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=host:29400",
        "--rdzv-id=job7",
        "--rdzv-conf=timeout=60",
        "--monitor-interval=0.5",
        "--log-dir=/tmp/logs",
        "--redirects=3",
        "--tee=1",
        "train.py",
    ]
    standalone = torchrun_args("--standalone", "--devices", "2", "train.py")
    assert standalone == ["--nproc-per-node=2", "--nnodes=1", "--max-restarts=0", "--standalone", "train.py"]
    # An explicit address is passed even so, for torchrun to warn that it ignores it.
    assert "--master-addr=h" in torchrun_args("--rdzv-backend", "c10d", "--main-address", "h", "train.py")


def test_script_arguments_are_preserved_even_when_they_look_like_ours() -> None:
    script_args = ["--devices", "7", "--lr=0.1", "-h", "--help", "positional", "--num_nodes", "3", "--"]
    args = torchrun_args("--devices", "2", "train.py", *script_args)
    assert args[0] == "--nproc-per-node=2"
    assert args[-len(script_args) - 1 :] == ["train.py", *script_args]


def test_torchrun_understands_the_translation() -> None:
    from torch.distributed import run as torchrun

    args = torchrun_args(
        "--devices", "3", "--num-nodes", "2", "--node-rank", "1", "--max-restarts", "2", "t.py", "--x", "1"
    )
    parsed = torchrun.parse_args(args)
    assert parsed.nproc_per_node == "3"
    assert (parsed.nnodes, parsed.node_rank, parsed.max_restarts) == ("2", 1, 2)
    assert (parsed.master_addr, parsed.master_port) == ("127.0.0.1", 29400)
    assert (parsed.training_script, parsed.training_script_args) == ("t.py", ["--x", "1"])
    rdzv = torchrun.parse_args(torchrun_args("--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "t.py"))
    assert (rdzv.rdzv_backend, rdzv.rdzv_endpoint) == ("c10d", "h:1")


# --- the workers' environment -----------------------------------------------------------------------


def test_worker_env_carries_only_the_options_the_user_gave() -> None:
    ns = parse("--accelerator", "cpu", "--devices", "2", "--precision", "16", "train.py")
    env = cli.build_worker_env(ns, base_env={}, num_cpus=8, num_processes=2)
    assert env == {
        _env_names.CLI_USED: "1",
        _env_names.CLI_ACCELERATOR: "cpu",
        _env_names.CLI_DEVICES: "2",
        _env_names.CLI_PRECISION: "16",
        "OMP_NUM_THREADS": "4",
    }
    everything = parse(
        "--accelerator", "gpu", "--strategy", "ddp", "--devices", "0,1", "--num-nodes", "3",
        "--precision", "bf16-mixed", "train.py",
    )  # fmt: skip
    env = cli.build_worker_env(everything, base_env={"OMP_NUM_THREADS": "7"}, num_cpus=8, num_processes=2)
    assert env == {
        _env_names.CLI_USED: "1",
        _env_names.CLI_ACCELERATOR: "gpu",
        _env_names.CLI_STRATEGY: "ddp",
        _env_names.CLI_DEVICES: "0,1",
        _env_names.CLI_NUM_NODES: "3",
        _env_names.CLI_PRECISION: "bf16-mixed",
    }


def test_worker_env_threads_and_elastic_node_range() -> None:
    defaults = cli.build_worker_env(parse("train.py"), {"PATH": "/bin"}, num_cpus=16, num_processes=1)
    assert defaults == {_env_names.CLI_USED: "1", "OMP_NUM_THREADS": "16"}
    crowded = cli.build_worker_env(parse("train.py"), base_env={}, num_cpus=2, num_processes=8)
    assert crowded["OMP_NUM_THREADS"] == "1"
    elastic = cli.build_worker_env(parse("--num-nodes", "1:4", "train.py"), {}, 4, 1)
    assert _env_names.CLI_NUM_NODES not in elastic


def test_check_collectives_turns_on_torchs_detail_checks_in_the_workers_only() -> None:
    env = cli.build_worker_env(parse("--check-collectives", "train.py"), {}, num_cpus=2, num_processes=2)
    assert env["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"
    assert "TORCH_DISTRIBUTED_DEBUG" not in cli.build_worker_env(parse("train.py"), {}, 2, 2)


def test_precision_choices_match_the_precision_module() -> None:
    from handloom.precision import PRECISION_INPUTS

    assert cli._PRECISION_CHOICES == PRECISION_INPUTS


# --- errors -----------------------------------------------------------------------------------------


def run_main_expecting_usage_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_missing_script_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.py"
    err = run_main_expecting_usage_error(["run", str(missing)], capsys)
    assert str(missing) in err
    assert "no file" in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--devices", "0"], "--devices 0"),
        (["--devices", "-2"], "--devices -2"),
        (["--devices", "abc"], "'abc'"),
        (["--devices", "0,0"], "'0,0'"),
        (["--devices", "0,-1"], "'0,-1'"),
        (["--num-nodes", "0"], "--num-nodes '0'"),
        (["--num-nodes", "3:1"], "--num-nodes '3:1'"),
        (["--num-nodes", "two"], "'two'"),
        (["--num-nodes", "2", "--node-rank", "2"], "--node-rank 2"),
        (["--node-rank", "-1"], "--node-rank -1"),
        (["--main-port", "70000"], "--main-port 70000"),
        (["--standalone", "--num-nodes", "2"], "--standalone --num-nodes 2"),
        (["--max-restarts", "-1"], "--max-restarts -1"),
        (["--accelerator", "mps", "--devices", "2"], "--accelerator mps --devices 2"),
        (["--accelerator", "cpu", "--devices", "0,1"], "--accelerator cpu --devices '0,1'"),
        (["--accelerator", "cpu", "--devices", "-1"], "--accelerator cpu --devices -1"),
        (["--precision", "17-mixed"], "'17-mixed'"),
        (["--accelerator", "tpu"], "'tpu'"),
        (["--strategy", "ddp_spawn"], "'ddp_spawn'"),
    ],
)
def test_bad_options_are_rejected_naming_the_value(
    options: list[str], expected: str, script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_main_expecting_usage_error(["run", *options, script], capsys)
    assert expected in err


def test_cuda_without_devices_is_rejected(
    script: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = ["run", "--accelerator", "cuda", "--devices", "auto", script]
    err = run_main_expecting_usage_error(argv, capsys)
    assert "has none" in err


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main_expecting_usage_error([], capsys)
    assert "COMMAND" in err


def test_help_lists_commands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in ((["--help"], ["run"]), (["run", "--help"], ["--num-nodes", "--num_nodes", "SCRIPT"])):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in words)


def test_parsing_does_not_import_torch() -> None:
    # Whatever `import handloom` costs, the command line must not add torch to it.
    code = (
        "import sys, handloom; before = 'torch' in sys.modules; import handloom.cli as c; "
        "c.build_parser().parse_args(['run', '--devices', '2', 'x.py']); "
        "print(before or 'torch' not in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# --- main with torchrun replaced -------------------------------------------------------------------


def test_main_hands_the_translation_to_torchrun_and_restores_the_env(
    script: str, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    from torch.distributed import run as torchrun

    seen: dict[str, object] = {}

    def fake_main(args: list[str]) -> None:
        seen["args"] = args
        seen["env"] = {name: os.environ.get(name) for name in (*HANDLOOM_VARS, "OMP_NUM_THREADS")}

    monkeypatch.setattr(torchrun, "main", fake_main)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cli.main(["run", "--accelerator", "cpu", "--devices", "2", script, "--epochs", "3"]) == 0
    assert seen["args"] == [
        "--nproc-per-node=2",
        "--nnodes=1",
        "--node-rank=0",
        "--master-addr=127.0.0.1",
        "--max-restarts=0",
        script,
        "--epochs",
        "3",
    ]
    assert seen["env"] == {
        _env_names.CLI_USED: "1",
        _env_names.CLI_ACCELERATOR: "cpu",
        _env_names.CLI_STRATEGY: None,
        _env_names.CLI_DEVICES: "2",
        _env_names.CLI_NUM_NODES: None,
        _env_names.CLI_PRECISION: None,
        "OMP_NUM_THREADS": "4",
    }
    assert not any(name in os.environ for name in (*HANDLOOM_VARS, "OMP_NUM_THREADS"))


def test_main_reports_failed_workers_with_exit_code_1(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clean_env: None
) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fake_main(args: list[str]) -> None:
        failure = ProcessFailure(local_rank=1, pid=4321, exitcode=3, error_file="<N/A>")
        raise ChildFailedError(name=script, failures={1: failure})

    monkeypatch.setattr(torchrun, "main", fake_main)
    assert cli.main(["run", script]) == 1
    err = capsys.readouterr().err
    assert f"{script} FAILED" in err
    assert "pid: 4321" in err
    assert "Traceback" not in err


# --- end to end -------------------------------------------------------------------------------------

WORKER = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if "--fail" in sys.argv and rank == 1:
    raise ValueError("rank 1 refuses to go on")
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
seen = {k: v for k, v in os.environ.items() if k.startswith("HANDLOOM_")}
result = {"rank": rank, "world": world, "sum": total.item(), "argv": sys.argv[1:], "env": seen}
# A file per rank: lines that two ranks print at once can interleave.
with open(os.path.join(os.path.dirname(__file__), f"rank{rank}.json"), "w") as out:
    json.dump(result, out)
dist.destroy_process_group()
"""


def launch(tmp_path: Path, *script_args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDLOOM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "handloom", "run", "--accelerator", "cpu", "--devices", "2"]
    start = time.perf_counter()
    argv = [*command, str(worker), *script_args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=100, check=False)
    return done, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_starts_every_rank_with_the_options(tmp_path: Path) -> None:
    done, _ = launch(tmp_path, "--devices", "9", "--flag")
    assert done.returncode == 0, done.stderr
    results = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(result["rank"] for result in results) == [0, 1]
    for result in results:
        assert (result["world"], result["sum"]) == (2, 3.0)
        assert result["argv"] == ["--devices", "9", "--flag"]
        assert result["env"] == {
            _env_names.CLI_USED: "1",
            _env_names.CLI_ACCELERATOR: "cpu",
            _env_names.CLI_DEVICES: "2",
        }


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_fails_fast_when_a_rank_raises(tmp_path: Path) -> None:
    done, seconds = launch(tmp_path, "--fail")
    assert done.returncode == 1
    assert "ValueError: rank 1 refuses to go on" in done.stderr
    assert "FAILED" in done.stderr
    assert seconds < 30
