"""Preemption handling: the signal flag, the grace watchdog and the Slurm requeue at exit.

Installing handlers changes the whole process, so every check that installs them runs in a small
child process (``handloom.preemption`` imports no torch: a child starts in well under a second).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from handloom.environments import LocalEnvironment, SLURMEnvironment
from handloom.preemption import check_grace, install_preemption_handlers, resolve_preemption

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SRC = Path(__file__).resolve().parents[2] / "src"
PLAIN_JOB = {"SLURM_JOB_ID": "4242"}
USR2 = signal.SIGUSR2
ARRAY_JOB = {"SLURM_JOB_ID": "4245", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "5"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HANDLOOM_", "TORCHELASTIC_"))}
    return {**env, "PYTHONPATH": str(SRC), **extra}


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"status {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


# --- the plan: pure, no handlers -------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_outside_slurm_only_sigterm_is_watched_and_nothing_is_requeued() -> None:
    plan = resolve_preemption(LocalEnvironment(), 0, PLAIN_JOB)
    assert (plan.signals, plan.requeue_job_id) == ((signal.SIGTERM,), None)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("environment", "rank", "env", "signals", "job_id"),
    [
        (SLURMEnvironment(), 0, PLAIN_JOB, (signal.SIGTERM, signal.SIGUSR1), "4242"),
        (SLURMEnvironment(), 0, ARRAY_JOB, (signal.SIGTERM, signal.SIGUSR1), "4240_5"),
        (SLURMEnvironment(), 1, PLAIN_JOB, (signal.SIGTERM, signal.SIGUSR1), None),
        (SLURMEnvironment(auto_requeue=False), 0, PLAIN_JOB, (signal.SIGTERM, signal.SIGUSR1), None),
        (SLURMEnvironment(requeue_signal=signal.SIGUSR2), 0, PLAIN_JOB, (signal.SIGTERM, USR2), "4242"),
        (SLURMEnvironment(requeue_signal=signal.SIGTERM), 0, PLAIN_JOB, (signal.SIGTERM,), "4242"),
        (SLURMEnvironment(requeue_signal=None), 0, PLAIN_JOB, (signal.SIGTERM,), "4242"),
    ],
    ids=["plain-job", "array-job", "rank-1", "no-auto-requeue", "sigusr2", "sigterm-twice", "no-signal"],
)
def test_under_slurm_the_requeue_signal_is_watched_and_rank_0_requeues(
    environment: SLURMEnvironment,
    rank: int,
    env: dict[str, str],
    signals: tuple[signal.Signals, ...],
    job_id: str | None,
) -> None:
    plan = resolve_preemption(environment, rank, env)
    assert (plan.signals, plan.requeue_job_id) == (signals, job_id)


@pytest.mark.timeout(10)
def test_a_missing_job_id_is_named() -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_ID is not set"):
        resolve_preemption(SLURMEnvironment(), 0, {})
    with pytest.raises(ValueError, match=r"SLURM_ARRAY_TASK_ID='x' is not a whole number"):
        resolve_preemption(SLURMEnvironment(), 0, {**ARRAY_JOB, "SLURM_ARRAY_TASK_ID": "x"})


@pytest.mark.timeout(10)
@pytest.mark.parametrize("grace", [0, -1, float("inf"), float("nan"), "10", True])
def test_a_bad_grace_is_refused(grace: object) -> None:
    with pytest.raises(ValueError, match=r"fabric.preemption_requested\(grace=.*\) is not a grace period"):
        check_grace(grace, "fabric.preemption_requested")
    assert check_grace(None) is None
    assert check_grace(3) == 3.0


@pytest.mark.timeout(10)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_sigint_and_uncatchable_signals_are_refused(signum: signal.Signals) -> None:
    before = signal.getsignal(signum)
    with pytest.raises(ValueError, match=f"cannot use {signum.name}"):
        install_preemption_handlers((signal.SIGTERM, signum))
    assert signal.getsignal(signum) == before  # refused before anything changed


# --- the handlers, in child processes ---------------------------------------------------------------
FLAG_CHILD = """
import os, signal, threading
from handloom.preemption import install_preemption_handlers

calls = []
signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))  # the user's own handler
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
errors = []
thread = threading.Thread(target=lambda: errors.append(_try(install_preemption_handlers)))
def _try(fn):
    try:
        fn()
    except RuntimeError as err:
        return str(err)
thread.start(); thread.join()
assert "only from the main thread" in errors[0], errors
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the refused call changed nothing

watched = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
watcher = install_preemption_handlers(watched, grace=None)
assert watcher.signals == (signal.SIGTERM, signal.SIGUSR1), watcher.signals  # SIGUSR2 stays ignored
assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C untouched
assert watcher.received is None and not watcher.requested

os.kill(os.getpid(), signal.SIGUSR1)
assert watcher.received == signal.SIGUSR1 and watcher.requested
assert calls == [signal.SIGUSR1]  # the earlier handler is still called
os.kill(os.getpid(), signal.SIGTERM)
assert watcher.received == signal.SIGUSR1  # the first signal is kept

assert install_preemption_handlers(watched, grace=None) is watcher  # once per process
try:
    install_preemption_handlers(watched, grace=5)
    raise AssertionError("a different grace was accepted")
except ValueError as err:
    assert "already installed" in str(err)

pid = os.fork()  # a forked child (a DataLoader worker) gets the handlers it had before
if pid == 0:
    ok = (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        and signal.getsignal(signal.SIGUSR1) is not None
        and signal.getsignal(signal.SIGUSR1).__name__ == "<lambda>"
        and signal.set_wakeup_fd(-1) == -1
    )
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the forked child kept handloom's handlers"
print("OK")
"""


@pytest.mark.timeout(30)
def test_a_signal_sets_the_flag_and_earlier_handlers_keep_running() -> None:
    result = _run(FLAG_CHILD)
    assert result.returncode == 0 and result.stdout.strip() == "OK", _output(result)


FORKED_WORKER_CHILD = """
import os, signal, time
from handloom.preemption import install_preemption_handlers

install_preemption_handlers((signal.SIGTERM, signal.SIGUSR1), grace=None)
pid = os.fork()  # a DataLoader worker: Slurm's warning reaches it too
if pid == 0:
    os.kill(os.getpid(), signal.SIGUSR1)  # ignored: the worker keeps feeding the loop
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)  # the default: the parent can still end it
    time.sleep(5)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.timeout(30)
def test_a_forked_worker_survives_slurms_warning_and_still_ends_on_sigterm() -> None:
    result = _run(FORKED_WORKER_CHILD)
    assert result.returncode == 0, _output(result)
    assert result.stdout.strip() == str(-signal.SIGTERM), _output(result)


WATCHDOG_CHILD = """
import os, signal, sys, time
from handloom.preemption import install_preemption_handlers

scenario = sys.argv[1]
if scenario == "blocked":  # like a collective: the main thread never runs Python signal handlers
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (and threads it starts inherit the mask)
watcher = install_preemption_handlers(grace=None if scenario == "second-signal" else 1.0)
print("ready", flush=True)
if scenario in ("acknowledged", "second-signal"):
    while watcher.received is None:  # the loop polls ...
        time.sleep(0.01)
    watcher.acknowledge()            # ... takes the request and saves, for longer than the grace
    print("saving", flush=True)
    time.sleep(2.0 if scenario == "acknowledged" else 30.0)
    sys.exit(0)
time.sleep(30)  # never polls
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("scenario", "returncode", "min_s", "max_s"),
    [
        ("never-polls", -signal.SIGTERM, 0.9, 4.0),
        ("blocked", -signal.SIGTERM, 0.9, 4.0),
        ("acknowledged", 0, 1.9, 6.0),
        ("second-signal", -signal.SIGTERM, 0.0, 2.0),
    ],
)
def test_the_grace_watchdog_ends_a_process_that_does_not_stop(
    scenario: str, returncode: int, min_s: float, max_s: float
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WATCHDOG_CHILD), scenario],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        if scenario == "second-signal":
            assert proc.stdout.readline().strip() == "saving"
            time.sleep(0.3)
            assert proc.poll() is None  # grace=None: the first signal alone never ends it
            proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        proc.wait(timeout=20)
        elapsed = time.monotonic() - start
        stderr = proc.stderr.read() if proc.stderr is not None else ""
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == returncode, stderr
    assert min_s <= elapsed <= max_s, f"ended after {elapsed:.2f} s\n{stderr}"
    if scenario in ("never-polls", "blocked"):
        assert "SIGTERM arrived 1 s ago and the training loop has not stopped" in stderr
    if scenario == "second-signal":
        assert "SIGTERM arrived again" in stderr


# --- Slurm requeue at exit, with a stand-in scontrol ------------------------------------------------
REQUEUE_CHILD = """
import json, os, signal, sys, time
from handloom.environments import SLURMEnvironment
from handloom.preemption import install_preemption_handlers, resolve_preemption

env, rank, send = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
plan = resolve_preemption(SLURMEnvironment(), rank, env)
watcher = install_preemption_handlers(
    plan.signals,
    requeue_job_id=plan.requeue_job_id,
    before_requeue=lambda: print("before requeue", flush=True),
)
if send:
    os.kill(os.getpid(), signal.SIGUSR1)
    while watcher.received is None:
        time.sleep(0.01)
if watcher.received is not None:  # what fabric.preemption_requested() does when it returns True
    watcher.acknowledge()
print("loop stopped", flush=True)
sys.exit(int(sys.argv[4]))
"""


def _scontrol(tmp_path: Path, body: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return _env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", SCONTROL_LOG=str(tmp_path / "log"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("env", "rank", "send", "expected"),
    [
        (PLAIN_JOB, 0, True, ["requeue 4242"]),
        (ARRAY_JOB, 0, True, ["requeue 4240_5"]),
        (PLAIN_JOB, 1, True, []),
        (PLAIN_JOB, 0, False, []),
    ],
    ids=["plain-job", "array-job", "rank-1", "no-signal"],
)
def test_rank_0_requeues_the_job_at_exit_after_a_signal(
    tmp_path: Path, env: dict[str, str], rank: int, send: bool, expected: list[str]
) -> None:
    child_env = _scontrol(tmp_path, 'echo "$@" >> "$SCONTROL_LOG"\n')
    result = _run(REQUEUE_CHILD, json.dumps(env), str(rank), "1" if send else "0", "0", env=child_env)
    assert result.returncode == 0, _output(result)
    log = tmp_path / "log"
    assert (log.read_text().splitlines() if log.exists() else []) == expected, _output(result)
    if expected:
        # The requeue comes after the loop stopped and after the background save was waited for.
        assert result.stdout.splitlines() == ["loop stopped", "before requeue"], _output(result)
        assert f"requeued Slurm job {expected[0].split()[1]}" in result.stderr
    else:
        assert "before requeue" not in result.stdout and "scontrol" not in result.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("failure", ["exits-1", "missing"])
@pytest.mark.parametrize("status", [0, 3])
def test_a_failing_scontrol_is_reported_and_the_exit_status_is_kept(
    tmp_path: Path, failure: str, status: int
) -> None:
    if failure == "missing":
        (tmp_path / "empty").mkdir()
        child_env = _env(PATH=str(tmp_path / "empty"))
    else:
        child_env = _scontrol(tmp_path, 'echo "scontrol: error: Invalid job id specified" >&2\nexit 1\n')
    result = _run(REQUEUE_CHILD, json.dumps(PLAIN_JOB), "0", "1", str(status), env=child_env)
    assert result.returncode == status, _output(result)
    assert "`scontrol requeue 4242` failed: " in result.stderr, _output(result)
    if failure == "missing":
        assert "scontrol is not on PATH" in result.stderr
    else:
        assert "exited with status 1: scontrol: error: Invalid job id specified" in result.stderr
    assert "Requeue it with `scontrol requeue 4242`" in result.stderr
    assert "Traceback" not in result.stderr


# --- through Fabric ---------------------------------------------------------------------------------
FABRIC_CHILD = """
import os, signal, sys
from handloom import Fabric

fabric = Fabric(accelerator="cpu", devices=1)
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a script that never asks keeps the default
def no_collective(*args, **kwargs):
    raise AssertionError("one process polled with a collective")
fabric.strategy.all_reduce = no_collective
assert fabric.preemption_requested() is False
assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
slurm = os.environ.get("SLURM_NTASKS") is not None
assert (signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL) is not slurm  # SIGUSR1 only under Slurm
os.kill(os.getpid(), signal.SIGUSR1 if slurm else signal.SIGTERM)
assert fabric.preemption_requested() is True
assert fabric.preemption_requested() is True  # and stays so
try:
    fabric.preemption_requested(grace=30)
    raise AssertionError("a different grace was accepted")
except ValueError as err:
    assert "already installed" in str(err), err
fabric.save(sys.argv[1], {"step": 3})
print("saved", flush=True)
"""
SLURM_TASK = {
    "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "train", **ARRAY_JOB,
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("slurm", [False, True], ids=["local", "slurm-array-task"])
def test_fabric_preemption_requested_in_one_process(tmp_path: Path, slurm: bool) -> None:
    child_env = _scontrol(tmp_path, 'echo "$@" >> "$SCONTROL_LOG"\n')
    if slurm:
        child_env.update(SLURM_TASK)
    result = _run(FABRIC_CHILD, str(tmp_path / "ckpt"), env=child_env)
    assert result.returncode == 0 and result.stdout.strip() == "saved", _output(result)
    assert (tmp_path / "ckpt").is_file()
    log = tmp_path / "log"
    assert (log.read_text().splitlines() if log.exists() else []) == (["requeue 4240_5"] if slurm else [])
