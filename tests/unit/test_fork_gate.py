"""Forked workers connect to the agent's store only once all of them are forked.

A worker forked while a thread of the parent holds glibc's resolver lock (the store server
resolving a sibling's address) would wait forever in its own first connection; a 4-process
``launch(fn)`` under pytest hung that way. The gate keeps forks and connections apart.
"""

from __future__ import annotations

import multiprocessing
import time

from handloom import launcher


def _record_pass(gates: list[object], queue: multiprocessing.Queue[float]) -> None:
    launcher._wait_for_siblings(gates)  # type: ignore[arg-type]
    queue.put(time.monotonic())


def test_a_forked_worker_waits_until_its_siblings_are_forked() -> None:
    spec = launcher.LaunchSpec(
        num_processes=2, num_nodes=1, node_rank=0, main_address="127.0.0.1", main_port=1
    )
    gates = launcher._fork_gates(spec)
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[float] = context.Queue()
    first = context.Process(target=_record_pass, args=(gates, queue))
    first.start()
    time.sleep(0.5)
    second_forked = time.monotonic()
    second = context.Process(target=_record_pass, args=(gates, queue))
    second.start()
    passes = [queue.get(timeout=30), queue.get(timeout=30)]
    first.join(timeout=30)
    second.join(timeout=30)
    assert first.exitcode == 0 and second.exitcode == 0
    assert min(passes) >= second_forked  # the first worker went on only after the second existed


def test_one_gate_per_attempt() -> None:
    spec = launcher.LaunchSpec(
        num_processes=3, num_nodes=1, node_rank=0, main_address="127.0.0.1", main_port=1, max_restarts=2
    )
    gates = launcher._fork_gates(spec)
    assert len(gates) == 3 and all(gate.parties == 3 for gate in gates)  # type: ignore[attr-defined]
