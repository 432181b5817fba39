"""``strategy="ddp"`` without an external launcher: the calling process becomes rank 0.

As in Lightning, ``fabric.launch()`` re-runs the script's command once for each other local rank
and returns in the caller, which goes on as local rank 0: code before ``launch()`` runs once per
process, and a ``try``/``except`` (or a test runner) around the training code behaves as usual.

The workers get the variables torchrun gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...), so each one finds its place as under torchrun. The caller watches them: when
one fails, the others are stopped and the caller ends with a non-zero status within seconds, and
when the caller fails, its workers are stopped too. No rank waits forever on a dead peer.
"""

from __future__ import annotations

import _thread
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handloom.launcher import LaunchSpec

# How often the caller checks its workers, and how long a stopped worker gets before SIGKILL.
_POLL_S = 0.2
_STOP_GRACE_S = 5.0
# How long the caller's main thread gets to unwind after a worker failed before it is ended.
_UNWIND_GRACE_S = 10.0


def worker_environment(spec: LaunchSpec, local_rank: int, run_id: str) -> dict[str, str]:
    """The variables that place local rank ``local_rank`` of this node in the job (torchrun's names)."""
    world_size = spec.num_processes * spec.num_nodes
    return {
        "MASTER_ADDR": spec.main_address,
        "MASTER_PORT": str(spec.main_port),
        "WORLD_SIZE": str(world_size),
        "RANK": str(spec.node_rank * spec.num_processes + local_rank),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(spec.num_processes),
        "GROUP_RANK": str(spec.node_rank),
        "GROUP_WORLD_SIZE": str(spec.num_nodes),
        "ROLE_RANK": str(spec.node_rank * spec.num_processes + local_rank),
        "ROLE_WORLD_SIZE": str(world_size),
        "NODE_RANK": str(spec.node_rank),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
    }


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"Signal {-code} ({name})"
    return f"exit code {code}"


class _Workers:
    """The worker processes of this node, watched by a daemon thread of the caller."""

    def __init__(self, procs: dict[int, subprocess.Popen[bytes]]) -> None:
        self.procs = procs  # local rank -> process
        self.failed: tuple[int, int] | None = None  # (local rank, exit code) of the first failure
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, name="handloom-workers", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while True:
            running = False
            for local_rank, proc in self.procs.items():
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0:
                    self._fail(local_rank, code)
                    return
            if not running:
                return
            time.sleep(_POLL_S)

    def _fail(self, local_rank: int, code: int) -> None:
        with self._lock:
            if self.failed is not None:
                return
            self.failed = (local_rank, code)
        rank = os.environ.get("GROUP_RANK", "0")
        print(
            f"handloom: the worker of local rank {local_rank} (node {rank}, pid"
            f" {self.procs[local_rank].pid}) ended with {_describe_exit(code)}; stopping the other ranks.",
            file=sys.stderr,
            flush=True,
        )
        self.stop()
        _thread.interrupt_main()  # the caller (rank 0) unwinds from wherever it waits
        time.sleep(_UNWIND_GRACE_S)
        os._exit(1)  # it did not finish unwinding: end it, never hang

    def stop(self) -> None:
        """Terminate every worker still running (SIGKILL after a grace period)."""
        alive = [p for p in self.procs.values() if p.poll() is None]
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def wait_at_exit(self) -> None:
        """At the caller's exit: wait for the workers; exit non-zero if any of them failed."""
        for proc in self.procs.values():
            proc.wait()
        self._watcher.join(timeout=_POLL_S * 5)
        if self.failed is not None:
            os._exit(1)


def start_workers(spec: LaunchSpec, command: list[str]) -> None:
    """Start the other local ranks of this node with ``command`` and make this process local rank 0.

    This process's own environment gets rank 0's variables, so it (and any Fabric made in it later)
    reads its place in the job as the workers do.
    """
    from handloom.launcher import run_id as make_run_id

    run_id = make_run_id(spec)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    for local_rank in range(1, spec.num_processes):
        env = {**os.environ, **worker_environment(spec, local_rank, run_id)}
        procs[local_rank] = subprocess.Popen([sys.executable, *command], env=env)
    os.environ.update(worker_environment(spec, 0, run_id))
    workers = _Workers(procs)
    atexit.register(workers.wait_at_exit)
    _stop_workers_if_the_caller_fails(workers)


def _stop_workers_if_the_caller_fails(workers: _Workers) -> None:
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        try:
            previous(exc_type, exc, tb)
        finally:
            workers.stop()

    sys.excepthook = hook
