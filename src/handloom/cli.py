"""The ``handloom`` command line: ``handloom run`` starts a script on every device through torchrun.

``handloom run [OPTIONS] SCRIPT [SCRIPT_ARGS...]`` translates its options into arguments for
``torch.distributed.run`` (torchrun) and calls it in this process. The options the user gave are also
written into the workers' environment (``HANDLOOM_*``) so that ``Fabric()`` in the script picks them
up. Everything after ``SCRIPT`` belongs to the script, even arguments that look like our options.

Parsing stays cheap: torch is imported only once the launch starts, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from handloom import _env_names
from handloom._version import __version__

__all__ = ["build_parser", "build_torchrun_args", "build_worker_env", "main", "resolve_num_processes"]

# Mirrors `handloom.precision.PRECISION_INPUTS` (a test keeps them equal). That module imports
# torch, which would make `handloom run --help` take seconds.
_PRECISION_CHOICES: tuple[str, ...] = (
    "32-true",
    "64-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
    "32",
    "16",
    "bf16",
)
_DEFAULT_DEVICES = "1"
_DEFAULT_MAIN_ADDRESS = "127.0.0.1"
# Used when several nodes meet through static rendezvous; on one node torchrun picks a free port.
_DEFAULT_MAIN_PORT = 29400
_ALL_DEVICES = ("auto", "-1")

_RUN_EPILOG = """\
examples:
  handloom run --accelerator cpu --devices 2 train.py --epochs 3
  handloom run --devices auto --precision bf16-mixed train.py
  handloom run --num-nodes 2 --node-rank 0 --main-address 10.0.0.1 train.py
  handloom run --num-nodes 1:4 --rdzv-backend c10d --rdzv-endpoint host:29400 --rdzv-id job7 train.py
"""


def _parse_devices(text: str) -> int | str | tuple[int, ...]:
    """Return a process count, ``"auto"`` (also for -1) or a tuple of GPU indices; raise ValueError."""
    value = text.strip()
    if value in _ALL_DEVICES:
        return "auto"
    if "," in value:
        try:
            indices = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            indices = ()
        if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ValueError(
                f"--devices {text!r} is not a list of distinct GPU indices. "
                "Write indices like '0,1' (or '0,' for GPU 0 alone)."
            )
        return indices
    try:
        count = int(value)
    except ValueError:
        raise ValueError(
            f"--devices {text!r} is not a device count. "
            "Give a positive number such as 2, 'auto' or -1 for every GPU, or GPU indices like '0,1'."
        ) from None
    if count == 0:
        raise ValueError(
            "--devices 0 asks for no devices, so there would be nothing to run on. "
            "Give a positive number such as 1 or 2, or 'auto' for every GPU."
        )
    if count < 0:
        raise ValueError(
            f"--devices {count} is negative; the only negative value with a meaning is -1 (every GPU). "
            "Give a positive number such as 2, or -1."
        )
    return count


def _parse_node_range(text: str) -> tuple[int, int]:
    """Return ``(min_nodes, max_nodes)`` from ``"N"`` or ``"MIN:MAX"``; raise ValueError."""
    parts = text.strip().split(":")
    try:
        bounds = [int(part) for part in parts]
    except ValueError:
        bounds = []
    if len(bounds) == 1:
        bounds = bounds * 2
    if len(bounds) != 2:
        raise ValueError(
            f"--num-nodes {text!r} is not a node count. "
            "Give a whole number such as 2, or MIN:MAX such as 1:4 for an elastic job."
        )
    low, high = bounds
    if low < 1 or high < low:
        raise ValueError(
            f"--num-nodes {text!r} cannot work: a job needs at least one node and MIN must not exceed MAX. "
            "Give --num-nodes 1 or more, or MIN:MAX such as 1:4."
        )
    return low, high


def _argtype(parse: Callable[[str], object]) -> Callable[[str], str]:
    """Turn a validating parser into an argparse ``type`` that keeps the text as written."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text.strip()

    check.__name__ = parse.__name__.strip("_")
    return check


def _strategy_name(text: str) -> str:
    """A strategy name ``handloom run`` accepts; DeepSpeed's names are refused with the FSDP/DDP call
    to use instead (Lightning's ``fabric run`` accepts them and fails in every process)."""
    name = text.strip()
    if name in _env_names.CLI_STRATEGY_NAMES:
        return name
    if name.lower().startswith("deepspeed"):
        from handloom.strategies.registry import build_strategy

        try:
            build_strategy(name.lower())
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                str(error).replace(f"Fabric(strategy={name.lower()!r})", f"--strategy {name}", 1)
            ) from None
    choices = ", ".join(repr(n) for n in _env_names.CLI_STRATEGY_NAMES)
    raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {choices})")


# Options handed to torchrun under its own name, only when given: (name, type, metavar, help).
_TORCHRUN_PASSTHROUGH: tuple[tuple[str, Callable[[str], object], str, str], ...] = (
    ("rdzv_backend", str, "NAME", "rendezvous backend, e.g. c10d (default: static, via --main-address)"),
    ("rdzv_endpoint", str, "HOST:PORT", "where the rendezvous backend listens"),
    ("rdzv_id", str, "ID", "job id shared by every node"),
    ("rdzv_conf", str, "K=V,...", "extra rendezvous settings"),
    ("monitor_interval", float, "SECONDS", "how often torchrun checks on the workers"),
    ("log_dir", str, "DIR", "where the workers' logs go"),
    ("redirects", str, "SPEC", "send the workers' output to --log-dir only, e.g. 3 for both streams"),
    ("tee", str, "SPEC", "copy the workers' output to --log-dir, e.g. 3 for both streams"),
)


def _flags(name: str) -> list[str]:
    """Both spellings of an option: ``--num-nodes`` and ``--num_nodes``."""
    return list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))


def _add_run_options(run: argparse.ArgumentParser) -> None:
    what = run.add_argument_group("what to run on (also passed to Fabric in the script)")
    what.add_argument(
        "--accelerator", choices=_env_names.ACCELERATOR_NAMES, help="hardware (default: Fabric decides)"
    )
    what.add_argument(
        "--strategy",
        type=_strategy_name,
        metavar="{" + ",".join(_env_names.CLI_STRATEGY_NAMES) + "}",
        help="how the processes share the work; 'dp' starts one process (default: Fabric decides)",
    )
    what.add_argument(
        "--devices",
        type=_argtype(_parse_devices),
        metavar="N",
        help="processes per node: a count, 'auto' or -1 for every GPU, or GPU indices like '0,1' "
        f"(default {_DEFAULT_DEVICES})",
    )
    what.add_argument(
        *_flags("num_nodes"),
        "--nnodes",
        dest="num_nodes",
        type=_argtype(_parse_node_range),
        metavar="N",
        help="number of nodes, or MIN:MAX for an elastic job (default 1)",
    )
    what.add_argument("--precision", choices=_PRECISION_CHOICES, help="(default: Fabric decides)")

    where = run.add_argument_group("how the nodes meet (passed to torchrun)")
    where.add_argument(*_flags("node_rank"), type=int, metavar="R", help="this node's rank (default 0)")
    where.add_argument(
        *_flags("main_address"), metavar="HOST", help=f"address of node 0 (default {_DEFAULT_MAIN_ADDRESS})"
    )
    where.add_argument(
        *_flags("main_port"),
        type=int,
        metavar="PORT",
        help=f"port on node 0 (default {_DEFAULT_MAIN_PORT} for several nodes, a free port on one node)",
    )
    where.add_argument("--standalone", action="store_true", help="one node: torchrun sets up the rendezvous")
    where.add_argument(
        *_flags("max_restarts"),
        type=int,
        default=0,
        metavar="N",
        help="restart every worker up to N times after a failure (default 0)",
    )
    for name, kind, metavar, text in _TORCHRUN_PASSTHROUGH:
        where.add_argument(*_flags(name), type=kind, metavar=metavar, help=text)
    debug = run.add_argument_group("debugging")
    debug.add_argument(
        *_flags("check_collectives"),
        action="store_true",
        help="check every collective across ranks (TORCH_DISTRIBUTED_DEBUG=DETAIL): one that some ranks"
        " never reach fails naming them, one that differs between ranks fails at once; slower",
    )

    run.add_argument("script", metavar="SCRIPT", help="path of the Python script to start")
    run.add_argument(
        "script_args", nargs=argparse.REMAINDER, metavar="SCRIPT_ARGS", help="passed to the script as written"
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with the way out added to an unknown option's error."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message += (
                ". See `handloom run --help` for the options; arguments for the script go after SCRIPT"
                " (e.g. `handloom run --devices 2 train.py --epochs 3`)."
            )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``handloom`` argument parser with one subcommand per action.

    Returns:
        The top-level parser. Each subcommand stores the function that carries it out in ``handler``.
    """
    parser = _Parser(
        prog="handloom", description="Launch and manage handloom training jobs.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"handloom {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    run = subparsers.add_parser(
        "run",
        help="launch a script on several devices or nodes through torchrun",
        description=(
            "Start SCRIPT once per device through torch.distributed.run (torchrun).\n"
            "The options given here also reach Fabric() inside the script.\n"
            "Every argument after SCRIPT is passed to the script, even one that looks like ours."
        ),
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_run_options(run)
    run.set_defaults(handler=functools.partial(_run_command, usage_error=run.error))
    consolidate = subparsers.add_parser(
        "consolidate",
        help="merge a sharded checkpoint directory into one file for torch.load",
        description=(
            "Merge the sharded checkpoint CKPT_DIR (written by fabric.save under FSDP or ModelParallel)\n"
            "into OUT_FILE, which torch.load reads into plain modules and optimizers."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    consolidate.add_argument("checkpoint_dir", metavar="CKPT_DIR")
    consolidate.add_argument("output_file", metavar="OUT_FILE", nargs="?", default=None)
    consolidate.add_argument(
        "--output_file", "--output-file", dest="output_option", default=None,
        help="the output file, as `fabric consolidate` takes it (default: CKPT_DIR.consolidated)",
    )  # fmt: skip
    consolidate.add_argument("--overwrite", action="store_true", help="replace OUT_FILE if it exists")
    consolidate.set_defaults(handler=functools.partial(_consolidate_command, usage_error=consolidate.error))
    return parser


def _consolidate_command(ns: argparse.Namespace, usage_error: Callable[[str], NoReturn]) -> int:
    from handloom.checkpoint.consolidate import consolidate

    if ns.output_file is not None and ns.output_option is not None and ns.output_file != ns.output_option:
        usage_error(f"OUT_FILE {ns.output_file!r} and --output_file {ns.output_option!r} differ; give one.")
    output = ns.output_file or ns.output_option or f"{ns.checkpoint_dir.rstrip('/')}.consolidated"
    try:
        written = consolidate(ns.checkpoint_dir, output, overwrite=ns.overwrite)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as err:
        print(f"handloom consolidate: error: {err}", file=sys.stderr)  # the paths given are wrong
        return 2
    except (OSError, RuntimeError) as err:
        print(f"handloom consolidate: error: {err}", file=sys.stderr)  # damaged input, full disk, ...
        return 1
    print(f"Wrote {written}")
    return 0


def resolve_num_processes(ns: argparse.Namespace, num_cuda_devices: int = 0) -> int:
    """Decide how many processes ``handloom run`` starts on each node.

    Args:
        ns: The parsed ``handloom run`` options.
        num_cuda_devices: How many CUDA devices this node has; used for ``--devices auto`` or ``-1``.

    Returns:
        The number of processes per node.

    Raises:
        ValueError: If ``--devices`` cannot work with ``--accelerator``.
    """
    if ns.strategy == "dp":
        return 1  # DataParallel drives every device from one process.
    written = ns.devices if ns.devices is not None else _DEFAULT_DEVICES
    devices = _parse_devices(written)
    accelerator = ns.accelerator
    if isinstance(devices, int):
        if accelerator == "mps" and devices > 1:
            raise ValueError(
                f"--accelerator mps --devices {written} asks for {devices} MPS devices, "
                "but a Mac exposes exactly one. Use --devices 1."
            )
        return devices
    if isinstance(devices, tuple):
        if accelerator in ("cpu", "mps"):
            raise ValueError(
                f"--accelerator {accelerator} --devices {written!r} lists device indices, "
                "which only GPUs have. Give a process count such as --devices 2."
            )
        return len(devices)
    # `devices` is "auto" here, written as "auto" or "-1".
    if accelerator == "cpu":
        if written.strip() == "-1":
            raise ValueError(
                "--accelerator cpu --devices -1 asks for every GPU, but the job runs on the CPU. "
                "Give a process count such as --devices 4."
            )
        return 1
    if accelerator == "mps":
        return 1
    if num_cuda_devices > 0:
        return num_cuda_devices
    if accelerator == "cuda":
        raise ValueError(
            f"--accelerator cuda --devices {written} asks for every CUDA device, but this node has none. "
            "Run on a machine with GPUs, or use --accelerator cpu."
        )
    return 1  # "gpu" and "auto" fall back to the single MPS device or the CPU.


def _validate(ns: argparse.Namespace) -> None:
    """Reject option combinations that cannot work before any process starts; raise ValueError."""
    if not os.path.isfile(ns.script):
        where = os.path.abspath(ns.script)
        raise ValueError(
            f"handloom run {ns.script}: there is no file at {where}. "
            "Pass the path of the Python script to launch, relative to the current directory or absolute."
        )
    if ns.node_rank is not None:
        _, max_nodes = _parse_node_range(ns.num_nodes or "1")
        if not 0 <= ns.node_rank < max_nodes:
            raise ValueError(
                f"--node-rank {ns.node_rank} is out of range for {max_nodes} node(s): "
                f"ranks run from 0 to {max_nodes - 1}. Give each node its own rank in that range."
            )
    if ns.standalone and _parse_node_range(ns.num_nodes or "1")[1] > 1:
        raise ValueError(
            f"--standalone --num-nodes {ns.num_nodes} cannot work: a standalone rendezvous lives on this "
            "machine alone. Drop --standalone and give --main-address, or --rdzv-backend and --rdzv-endpoint."
        )
    if ns.main_port is not None and not 0 < ns.main_port < 65536:
        raise ValueError(
            f"--main-port {ns.main_port} is not a TCP port. Give a free port between 1 and 65535."
        )
    if ns.max_restarts < 0:
        raise ValueError(
            f"--max-restarts {ns.max_restarts} is negative. Give 0 (no restarts) or a positive count."
        )


def _is_static_rendezvous(ns: argparse.Namespace) -> bool:
    return not ns.standalone and ns.rdzv_backend in (None, "static")


def build_torchrun_args(ns: argparse.Namespace, num_cuda_devices: int = 0) -> list[str]:
    """Translate ``handloom run`` options into arguments for ``torch.distributed.run``.

    The node address, port and rank apply to torchrun's static rendezvous (its default); with another
    rendezvous they are passed only when given, so torchrun can warn that it ignores them. On one node
    without ``--main-port``, the port is left to torchrun, which then picks a free one.

    Args:
        ns: The parsed ``handloom run`` options.
        num_cuda_devices: How many CUDA devices this node has; used for ``--devices auto`` or ``-1``.

    Returns:
        The argument list, ending with the script and its own arguments.

    Raises:
        ValueError: If ``--devices`` cannot work with ``--accelerator``.
    """
    num_nodes = ns.num_nodes or "1"
    args = [f"--nproc-per-node={resolve_num_processes(ns, num_cuda_devices)}", f"--nnodes={num_nodes}"]
    static = _is_static_rendezvous(ns)
    address = ns.main_address if ns.main_address is not None or not static else _DEFAULT_MAIN_ADDRESS
    node_rank = ns.node_rank if ns.node_rank is not None or not static else 0
    port = ns.main_port
    if port is None and static and _parse_node_range(num_nodes)[1] > 1:
        port = _DEFAULT_MAIN_PORT
    for flag, value in (("--node-rank", node_rank), ("--master-addr", address), ("--master-port", port)):
        if value is not None:
            args.append(f"{flag}={value}")
    args.append(f"--max-restarts={ns.max_restarts}")
    if ns.standalone:
        args.append("--standalone")
    for name, *_ in _TORCHRUN_PASSTHROUGH:
        value = getattr(ns, name)
        if value is not None:
            args.append(f"{_flags(name)[0]}={value}")
    return [*args, ns.script, *ns.script_args]


def build_worker_env(
    ns: argparse.Namespace, base_env: Mapping[str, str], num_cpus: int, num_processes: int
) -> dict[str, str]:
    """Return the variables to add to the launcher's environment for its workers to inherit.

    Only options the user wrote are passed on, as written, so ``Fabric()`` can tell them from its
    defaults. An elastic node range (``MIN:MAX``) is not passed: the node count is settled at rendezvous.

    Args:
        ns: The parsed ``handloom run`` options.
        base_env: The environment the launcher started with.
        num_cpus: CPU cores on this node, shared among its processes for ``OMP_NUM_THREADS``.
        num_processes: Processes started on this node.

    Returns:
        Variable names mapped to values; ``base_env`` is not modified.
    """
    env = {_env_names.CLI_USED: "1"}
    given = {
        _env_names.CLI_ACCELERATOR: ns.accelerator,
        _env_names.CLI_STRATEGY: ns.strategy,
        _env_names.CLI_DEVICES: ns.devices,
        _env_names.CLI_PRECISION: ns.precision,
    }
    if ns.num_nodes is not None and ":" not in ns.num_nodes:
        given[_env_names.CLI_NUM_NODES] = ns.num_nodes
    env.update({name: value for name, value in given.items() if value is not None})
    if ns.check_collectives:
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"  # torch's own switch, read when the workers import it
    if "OMP_NUM_THREADS" not in base_env:
        env["OMP_NUM_THREADS"] = str(max(1, num_cpus // max(1, num_processes)))
    return env


def _run_command(ns: argparse.Namespace, usage_error: Callable[[str], NoReturn]) -> int:
    try:
        _validate(ns)
        import torch

        num_cuda_devices = torch.cuda.device_count()
        torchrun_args = build_torchrun_args(ns, num_cuda_devices)
        num_processes = resolve_num_processes(ns, num_cuda_devices)
    except ValueError as err:
        usage_error(str(err))
    worker_env = build_worker_env(ns, os.environ, os.cpu_count() or 1, num_processes)
    return _launch(torchrun_args, worker_env)


def _launch(torchrun_args: Sequence[str], worker_env: Mapping[str, str]) -> int:
    """Run torchrun in this process with ``worker_env`` added to the environment its workers inherit."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    previous = {name: os.environ.get(name) for name in worker_env}
    os.environ.update(worker_env)
    try:
        torchrun.main(list(torchrun_args))
    except ChildFailedError as err:
        # The workers printed their own tracebacks; this adds torchrun's summary of who failed.
        print(str(err), file=sys.stderr)
        return 1
    except SignalException as err:
        print(f"handloom run: stopped by {err.sigval.name}; the workers were terminated.", file=sys.stderr)
        return 128 + int(err.sigval)
    finally:
        # Leave the caller's environment as it was, for when `main` is called from Python.
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``handloom`` command line.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit code: 0 on success, 1 when a worker failed, 128 + N when stopped by signal N.

    Raises:
        SystemExit: With code 2 for options that cannot work, and 0 after ``--help``.
    """
    ns = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = ns.handler
    return handler(ns)
