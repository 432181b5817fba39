"""Start one process per device with PyTorch's elastic agent (``torch.distributed.launcher``).

:func:`launch_function` starts ``fn(fabric, *args)`` in spawned or forked workers
(``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``) and returns rank 0's result
(``strategy="ddp"`` re-runs the script instead: :mod:`handloom.script_launcher`).

If any worker fails, the agent stops the others at once and the failing rank's traceback is shown.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

    from handloom.environments import Topology


class WorkerFailedError(RuntimeError):
    """A worker process failed; the message carries the first failing rank's traceback."""

    def __init__(self, rank: int | None, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Where and how many workers to start on this node."""

    num_processes: int
    num_nodes: int
    node_rank: int
    main_address: str
    main_port: int
    max_restarts: int = 0


def find_free_port() -> int:
    """Ask the OS for a free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spec_from_topology(topology: Topology, num_processes: int, num_nodes: int) -> LaunchSpec:
    """Build a launch spec for this node; a single node without a fixed port gets a free one."""
    port = topology.main_port
    if port is None:
        if num_nodes > 1:
            raise ValueError(
                f"Fabric(num_nodes={num_nodes}) needs every node to meet at one port, but MASTER_PORT is not"
                " set. Set MASTER_ADDR, MASTER_PORT and NODE_RANK on each node, or use `handloom run`."
            )
        port = find_free_port()
    return LaunchSpec(
        num_processes=num_processes,
        num_nodes=num_nodes,
        node_rank=topology.node_rank,
        main_address=topology.main_address or "127.0.0.1",
        main_port=port,
    )


def run_id(spec: LaunchSpec) -> str:
    """An id that is the same on every node of one job and differs between jobs on other ports."""
    if spec.num_nodes > 1:
        return f"handloom-{spec.main_address}-{spec.main_port}"
    return f"handloom-{uuid.uuid4().hex[:8]}"


def _config(spec: LaunchSpec, start_method: str) -> LaunchConfig:
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=spec.num_nodes,
        max_nodes=spec.num_nodes,
        nproc_per_node=spec.num_processes,
        # Every node must agree on the run id (the static rendezvous prefixes its store keys with it),
        # so it comes from what the nodes share: the main address and port.
        run_id=run_id(spec),
        rdzv_backend="static",
        rdzv_endpoint=f"{spec.main_address}:{spec.main_port}",
        rdzv_configs={"rank": spec.node_rank},
        max_restarts=spec.max_restarts,
        monitor_interval=0.1,
        start_method=start_method,
    )


def script_command() -> list[str]:
    """This process's command line without the interpreter, to re-run it in workers."""
    # sys.orig_argv keeps interpreter options and `-m module` / `-c code` exactly as typed.
    return list(sys.orig_argv[1:])


def launch_function(
    spec: LaunchSpec,
    start_method: str,
    fabric: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``fn(fabric, *args, **kwargs)`` in each worker and return the lowest local rank's result.

    Raises:
        WorkerFailedError: A worker raised or died; the message shows the first failure.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    error_dir = tempfile.mkdtemp(prefix="handloom-errors-")
    gates = _fork_gates(spec) if start_method == "fork" else None
    # Spawned workers start from a fresh interpreter: give them this process's random and
    # determinism state, as Lightning does (forked ones inherit it anyway).
    parent_state = GlobalState.capture() if start_method == "spawn" else None
    try:
        with _fork_safe_garbage(start_method), _environment_kept():
            results = elastic_launch(_config(spec, start_method), _worker)(
                fabric, fn, args, kwargs, error_dir, gates, parent_state
            )
    except ChildFailedError as err:
        raise _first_failure(error_dir, err) from None
    finally:
        shutil.rmtree(error_dir, ignore_errors=True)
    return results[min(results)]


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo what the elastic agent writes into this process's environment while it runs workers
    (``TORCHELASTIC_SIGNALS_TO_HANDLE``): the caller's environment is the same after ``launch``."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


# How long a forked worker waits for its siblings to be forked before it goes on regardless.
_FORK_GATE_TIMEOUT_S = 120.0


def _fork_gates(spec: LaunchSpec) -> list[Any]:
    """One barrier per attempt (first start and each restart) for the workers forked on this node.

    A forked worker inherits every lock of this process as it was at the fork. The agent's store
    server runs in a thread here and resolves the address of each worker that connects to it
    (``getnameinfo``, which takes glibc's resolver lock); a worker forked while that thread holds
    the lock waits forever on its own first connection. So forked workers wait at a barrier until
    all of them exist, and only then connect: no fork happens while the server thread is busy.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")
    return [context.Barrier(spec.num_processes) for _ in range(spec.max_restarts + 1)]


def _wait_for_siblings(gates: list[Any]) -> None:
    """Wait until every worker of this attempt is forked (see :func:`_fork_gates`)."""
    import threading

    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt >= len(gates):
        return
    # A broken barrier: a sibling died before it got here, and the agent is ending the attempt anyway.
    with contextlib.suppress(threading.BrokenBarrierError):
        gates[attempt].wait(timeout=_FORK_GATE_TIMEOUT_S)


@contextlib.contextmanager
def _fork_safe_garbage(start_method: str) -> Iterator[None]:
    """Keep forked workers from collecting this process's garbage.

    An unreachable object that owns a thread here, such as the TCPStore of an earlier launch that
    a reference cycle keeps alive, would be destroyed by the first garbage collection in a forked
    child, where its thread does not exist: joining it hangs the worker forever. So the garbage is
    collected here first, and everything else is frozen (``gc.freeze``) while workers are forked,
    which is the practice Python's documentation gives for ``fork``.
    """
    if start_method != "fork":
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _worker(
    fabric: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error_dir: str,
    gates: list[Any] | None,
    parent_state: GlobalState | None = None,
) -> Any:
    if parent_state is not None:  # spawned
        parent_state.restore()
    if gates is not None:  # forked
        _wait_for_siblings(gates)
        _single_threaded_after_fork()
        # The agent's own SIGTERM handler (raise in Python, later) came along with the fork. A worker
        # blocked inside a collective would not run it until the call returns, so the agent's stop
        # would wait its 30 s before SIGKILL; the default action ends the worker at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        fabric._enter_worker()
        result = fn(fabric, *args, **kwargs)
    except BaseException as exc:
        record_failure(exc, os.path.join(error_dir, f"rank-{os.environ.get('RANK', '0')}.json"))
        raise
    from handloom.apply import move_data_to_device

    return move_data_to_device(result, "cpu")


@dataclass(frozen=True)
class GlobalState:
    """The process-wide settings a spawned worker takes over from the process that launched it:
    the random streams (Python, NumPy, torch) and torch's determinism switches."""

    rng: dict[str, Any]
    deterministic: bool
    deterministic_warn_only: bool
    cudnn_benchmark: bool

    @classmethod
    def capture(cls) -> GlobalState:
        """This process's state."""
        import torch

        from handloom.checkpoint.resume import capture_rng

        return cls(
            rng=capture_rng(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )

    def restore(self) -> None:
        """Make this process's state the captured one."""
        import torch

        from handloom.checkpoint.resume import restore_rng

        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        restore_rng(self.rng)


def _single_threaded_after_fork() -> None:
    """Run this forked worker's CPU ops on one intra-op thread.

    GNU OpenMP (torch's CPU thread pool on Linux) is not fork-safe: once the parent has run a
    parallel region, the child's first parallel region waits forever for pool threads that were
    not forked. One thread per worker avoids it, as torch's own DataLoader workers do, and is also
    what ``torchrun`` chooses for several processes on one machine.
    """
    import torch

    torch.set_num_threads(1)


def record_failure(exc: BaseException, path: str) -> None:
    """Write this rank's failure (time, rank, traceback) as JSON to ``path``."""
    record = {
        "time": time.time(),
        "rank": int(os.environ.get("RANK", "0")),
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def _first_failure(error_dir: str, err: Exception) -> WorkerFailedError:
    records = []
    for name in os.listdir(error_dir):
        with open(os.path.join(error_dir, name), encoding="utf-8") as handle:
            records.append(json.load(handle))
    if not records:
        return WorkerFailedError(None, f"A worker process died without a Python traceback.\n{err}")
    first = min(records, key=lambda r: r["time"])
    others = sorted(r["rank"] for r in records if r is not first)
    also = f" (ranks {others} failed after it)" if others else ""
    return WorkerFailedError(
        first["rank"],
        f"Rank {first['rank']} failed first with {first['type']}: {first['message']}{also}.\n"
        f"Its traceback:\n{first['traceback']}",
    )


def install_failure_recorder() -> None:
    """In a torchelastic worker, write uncaught exceptions to the agent's error file.

    The agent then names the rank that failed first (by time) as the root cause, instead of a
    rank that merely lost its connection to it.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file or getattr(sys.excepthook, "_handloom", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:
            ErrorHandler().record_exception(exc)
        finally:
            previous(exc_type, exc, tb)

    hook._handloom = True  # type: ignore[attr-defined]
    sys.excepthook = hook
