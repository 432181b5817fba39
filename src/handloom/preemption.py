"""Preemption: SIGTERM (and Slurm's warning signal) become a flag the training loop polls.

A scheduler that wants a job gone sends SIGTERM first (torchrun's agent, Kubernetes, Slurm at the
time limit or on preemption), and with ``#SBATCH --signal=USR1@90`` Slurm warns 90 s ahead. By
default either signal ends the process at once and the work since the last checkpoint is lost.
:func:`install_preemption_handlers` replaces that with three parts:

* a handler that only records the first signal in :attr:`PreemptionWatcher.received`, so the
  loop can save and stop (``fabric.preemption_requested()`` polls it, agreed across ranks);
* a grace watchdog: a thread that learns of the signal through ``signal.set_wakeup_fd`` (written
  by the interpreter's C-level handler, so even while the main thread is blocked in a collective)
  and, if the loop has not taken the request within ``grace`` seconds, ends the process the way
  the signal would have. A second copy of the same signal ends it at once;
* under Slurm with ``SLURMEnvironment(auto_requeue=True)``, an exit hook on global rank 0 that runs
  ``scontrol requeue <job id>`` after the loop has stopped and saved.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from handloom.environments import ClusterEnvironment, SLURMEnvironment

__all__ = [
    "DEFAULT_GRACE_S",
    "PreemptionPlan",
    "PreemptionWatcher",
    "check_grace",
    "install_preemption_handlers",
    "requeue_slurm_job",
    "resolve_preemption",
]

DEFAULT_GRACE_S = 10.0
_SCONTROL_TIMEOUT_S = 60.0
_KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL
_UNCATCHABLE = {getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_watcher: PreemptionWatcher | None = None
_fork_hook_registered = False


@dataclass(frozen=True, slots=True)
class PreemptionPlan:
    """Which signals mean "save and stop" for this process, and which job to requeue at exit.

    Attributes:
        signals: SIGTERM, plus Slurm's requeue signal when the job runs under Slurm.
        requeue_job_id: The Slurm job id global rank 0 requeues (``SLURMEnvironment(auto_requeue=True)``),
            else ``None``.
    """

    signals: tuple[signal.Signals, ...]
    requeue_job_id: str | None


def resolve_preemption(
    environment: ClusterEnvironment, global_rank: int, env: Mapping[str, str]
) -> PreemptionPlan:
    """Decide the preemption signals and the requeue target from the launch environment.

    Args:
        environment: The cluster environment Fabric detected or was given.
        global_rank: This process's global rank; only rank 0 requeues.
        env: The environment variables ``environment`` parses (a dict in tests).

    Returns:
        The plan. Outside Slurm only SIGTERM is watched: SIGUSR1 is left to other tools there.

    Raises:
        ValueError: Slurm auto-requeue is on but the job id variables are missing or malformed.
    """
    signals = [signal.SIGTERM]
    job_id = None
    if isinstance(environment, SLURMEnvironment):
        if environment.requeue_signal is not None and environment.requeue_signal not in signals:
            signals.append(environment.requeue_signal)
        if environment.auto_requeue and global_rank == 0:
            job_id = environment.requeue_id(env)
    return PreemptionPlan(tuple(signals), job_id)


def check_grace(grace: object, call: str = "install_preemption_handlers") -> float | None:
    """Return ``grace`` as seconds, or ``None`` (no watchdog).

    Raises:
        ValueError: ``grace`` is not a positive, finite number of seconds or ``None``.
    """
    if grace is None:
        return None
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 < grace < math.inf:
        raise ValueError(
            f"{call}(grace={grace!r}) is not a grace period. It is how many seconds after a preemption"
            " signal the process may run before it is ended. Pass a number of seconds > 0 (the default"
            f" is {DEFAULT_GRACE_S:g}), or None to never end it."
        )
    return float(grace)


class PreemptionWatcher:
    """The handlers, watchdog and exit hook of one process; build it with :func:`install_preemption_handlers`.

    Attributes:
        signals: The signals this process listens to (a signal that was ignored, ``SIG_IGN``,
            stays ignored and is not listed).
        grace: Seconds from the first signal until the watchdog ends the process, or ``None``.
        requeue_job_id: The Slurm job requeued at exit, or ``None``.
        received: The first preemption signal received, or ``None``. The handler sets it.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...],
        grace: float | None,
        requeue_job_id: str | None,
        before_requeue: Callable[[], None] | None,
    ) -> None:
        self.signals = signals
        self.grace = grace
        self.requeue_job_id = requeue_job_id
        self.received: signal.Signals | None = None
        self._key = (signals, grace, requeue_job_id)
        self._before_requeue = before_requeue
        self._acknowledged = False
        self._requeued = False
        self._previous: dict[signal.Signals, _Handler] = {}
        self._old_wakeup_fd = -1
        self._reader, self._writer = socket.socketpair()
        self._set_default_action: Callable[[int], object] | None = None

    @property
    def requested(self) -> bool:
        """True once this process received a signal or the loop acknowledged another rank's."""
        return self.received is not None or self._acknowledged

    def acknowledge(self) -> None:
        """Record that the loop has seen the request and is stopping.

        The grace watchdog then no longer ends the process (saving may take longer than
        ``grace``; the scheduler's own kill still bounds it), and the exit hook requeues the job.
        """
        self._acknowledged = True

    # --- installation (main thread) ------------------------------------------------------------
    def _install(self) -> None:
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous is None:
                raise RuntimeError(
                    f"{signum.name} has a handler that was installed outside Python, which handloom"
                    " can neither call nor restore. Remove it before asking for preemption"
                    " handling, or do not call fabric.preemption_requested()."
                )
            self._previous[signum] = previous
        self.signals = tuple(s for s in self.signals if self._previous[s] is not signal.SIG_IGN)
        self._set_default_action = _default_action_setter()
        self._writer.setblocking(False)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno())
        for signum in self.signals:
            signal.signal(signum, self._record)
        threading.Thread(target=self._watch, name="handloom-preemption-watchdog", daemon=True).start()
        if self.requeue_job_id is not None:
            atexit.register(self._requeue_at_exit)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: record the first signal, then call the handler installed before."""
        if self.received is None:
            self.received = signal.Signals(signum)
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous):
            previous(signum, frame)

    def _restore_after_fork(self) -> None:
        """In a forked child (a DataLoader worker, say), put back what the parent had before us.

        Except that a warning signal other than SIGTERM (Slurm's SIGUSR1), whose default would kill
        the child, is ignored there: Slurm sends it to every process of the step, and a worker
        killed by it fails the parent's next batch just when the loop is saving. The parent decides
        when its workers stop. SIGTERM keeps its default, so the parent can still end them.
        """
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for signum, previous in self._previous.items():
                keep_alive = signum != signal.SIGTERM and previous is signal.SIG_DFL
                signal.signal(signum, signal.SIG_IGN if keep_alive else previous)
        self._reader.close()
        self._writer.close()
        atexit.unregister(self._requeue_at_exit)

    # --- the watchdog thread -------------------------------------------------------------------
    def _watch(self) -> None:
        if hasattr(signal, "pthread_sigmask"):  # a thread inherits its creator's blocked signals
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        first: signal.Signals | None = None
        deadline: float | None = None
        seen: set[int] = set()
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._reader], [], [], timeout)
            if not readable:
                deadline = None
                if first is not None and not self._acknowledged and self._is_ours(first):
                    self._end_process(
                        first,
                        f"{first.name} arrived {self.grace:g} s ago and the training loop has not stopped:"
                        " it has not called fabric.preemption_requested() since, or it is blocked (for"
                        " example in a collective whose peer is gone). Poll it every step, or give the"
                        " loop more time with fabric.preemption_requested(grace=...).",
                    )
                continue
            data = self._reader.recv(512)
            if self._old_wakeup_fd != -1:
                with contextlib.suppress(OSError):  # keep asyncio (or whoever set it before) informed
                    os.write(self._old_wakeup_fd, data)
            for number in data:
                if number not in self.signals or not self._is_ours(number):
                    continue
                if number in seen:
                    self._end_process(signal.Signals(number), f"{signal.Signals(number).name} arrived again.")
                seen.add(number)
                if first is None:
                    first = signal.Signals(number)
                    if self.grace is not None and not self._acknowledged:
                        deadline = time.monotonic() + self.grace

    def _is_ours(self, signum: int) -> bool:
        # Someone who replaced our handler after us owns the signal now: the watchdog stands back.
        return signal.getsignal(signum) == self._record

    def _end_process(self, signum: signal.Signals, reason: str) -> None:
        """End the process with ``signum``'s default action (from this thread: no ``signal.signal``)."""
        message = f"handloom: {reason} Ending the process the way {signum.name} does.\n"
        with contextlib.suppress(OSError):  # os.write: the main thread may hold sys.stderr's lock
            os.write(2, message.encode())
        if self._set_default_action is not None:
            self._set_default_action(int(signum))
        os.kill(os.getpid(), signum)
        time.sleep(1.0)
        os.kill(os.getpid(), _KILL)  # the default action did not end it (ctypes unavailable)

    # --- requeue at exit -----------------------------------------------------------------------
    def _requeue_at_exit(self) -> None:
        if self._requeued or self.requeue_job_id is None or not self._acknowledged:
            return
        self._requeued = True
        try:
            if self._before_requeue is not None:
                self._before_requeue()  # the checkpoint in flight lands before Slurm stops the job
            requeue_slurm_job(self.requeue_job_id)
        except Exception as err:  # an exit hook must not raise
            print(f"handloom: the Slurm requeue at exit failed: {err}", file=sys.stderr, flush=True)


def install_preemption_handlers(
    signals: Sequence[signal.Signals] = (signal.SIGTERM,),
    *,
    grace: float | None = DEFAULT_GRACE_S,
    requeue_job_id: str | None = None,
    before_requeue: Callable[[], None] | None = None,
) -> PreemptionWatcher:
    """Listen for preemption signals in this process (once; later calls return the same watcher).

    A handler someone installed before keeps being called after the signal is recorded; a signal
    set to ``SIG_IGN`` stays ignored. SIGINT is never touched. The second copy of a signal ends
    the process at once, whatever the earlier handler does with it. A process forked afterwards
    (a DataLoader worker) gets the parent's earlier handlers back.

    Args:
        signals: The signals that mean "save and stop".
        grace: Seconds after the first signal until the process is ended the way that signal
            ends it, unless the loop has acknowledged the request; ``None`` never ends it.
        requeue_job_id: A Slurm job to ``scontrol requeue`` at exit once the loop has
            acknowledged a request (pass it on global rank 0 only).
        before_requeue: Called before the requeue (Fabric waits for a background save there).

    Returns:
        The process's watcher.

    Raises:
        RuntimeError: Called first from a thread other than the main thread, or a signal has a
            handler installed outside Python.
        ValueError: A signal that cannot be handled (SIGINT, SIGKILL, SIGSTOP), a bad ``grace``,
            or arguments that differ from the first call's.
    """
    global _watcher, _fork_hook_registered
    grace = check_grace(grace)
    chosen = tuple(dict.fromkeys(signal.Signals(s) for s in signals))
    for signum in chosen:
        if signum == signal.SIGINT or signum in _UNCATCHABLE:
            raise ValueError(
                f"install_preemption_handlers(signals=[..., {signum.name}]) cannot use {signum.name}: "
                "SIGINT stays Python's KeyboardInterrupt, and SIGKILL and SIGSTOP cannot be caught. "
                "Use SIGTERM or SIGUSR1 (#SBATCH --signal=USR1@90)."
            )
    if _watcher is not None:
        if _watcher._key != (chosen, grace, requeue_job_id):
            raise ValueError(
                f"Preemption handlers are already installed in this process with signals="
                f"{[s.name for s in _watcher._key[0]]}, grace={_watcher.grace}, requeue_job_id="
                f"{_watcher.requeue_job_id!r}, and cannot change to signals={[s.name for s in chosen]},"
                f" grace={grace}, requeue_job_id={requeue_job_id!r}. Pass the same values every time."
            )
        return _watcher
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"Preemption handlers were requested from thread {threading.current_thread().name!r}, but"
            " Python installs signal handlers only from the main thread. Make the first call to"
            " fabric.preemption_requested() in the main thread."
        )
    watcher = PreemptionWatcher(chosen, grace, requeue_job_id, before_requeue)
    watcher._install()
    _watcher = watcher
    if not _fork_hook_registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)
        _fork_hook_registered = True
    return watcher


def _default_action_setter() -> Callable[[int], object] | None:
    """libc's ``signal(signum, SIG_DFL)``, which unlike ``signal.signal`` works from any thread."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        setter = libc.signal
    except (OSError, AttributeError, TypeError):  # no C library to load by name (Windows)
        return None
    setter.restype = ctypes.c_void_p
    setter.argtypes = (ctypes.c_int, ctypes.c_void_p)
    return lambda signum: setter(signum, None)  # a NULL handler is SIG_DFL


def _forget_in_child() -> None:
    global _watcher
    watcher, _watcher = _watcher, None
    if watcher is not None:
        watcher._restore_after_fork()


def requeue_slurm_job(job_id: str) -> bool:
    """Run ``scontrol requeue JOB_ID``; report the outcome on stderr instead of raising.

    Returns:
        Whether ``scontrol`` succeeded.
    """
    command = ["scontrol", "requeue", job_id]
    shown = " ".join(command)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_SCONTROL_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        problem = "scontrol is not on PATH"
    except (OSError, subprocess.SubprocessError) as err:
        problem = f"{type(err).__name__}: {err}"
    else:
        if result.returncode == 0:
            print(f"handloom: requeued Slurm job {job_id} (`{shown}`).", file=sys.stderr, flush=True)
            return True
        output = (result.stderr or result.stdout).strip()
        problem = f"it exited with status {result.returncode}" + (f": {output}" if output else "")
    print(
        f"handloom: `{shown}` failed: {problem}. SLURMEnvironment(auto_requeue=True) requeues a"
        " preempted job when it exits, so this job will not restart by itself. Requeue it with"
        f" `{shown}` or submit it again; Fabric(plugins=SLURMEnvironment(auto_requeue=False)) stops"
        " handloom from trying.",
        file=sys.stderr,
        flush=True,
    )
    return False
