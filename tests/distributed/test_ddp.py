"""DDP on real gloo process groups (2 forked processes per test): what users rely on."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.launcher import WorkerFailedError
from handloom.plugins.precision import MixedPrecision
from handloom.strategies import DDPStrategy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _fabric(**kwargs: Any) -> Fabric:
    return Fabric(accelerator="cpu", devices=2, strategy="ddp_fork", **kwargs)


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen)


def _same_on_all_ranks(fabric: Fabric, tensor: torch.Tensor) -> bool:
    gathered = fabric.all_gather(tensor.detach())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _train_checks(fabric: Fabric) -> dict[str, Any]:
    rank = fabric.global_rank
    torch.manual_seed(0)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    assert list(model.state_dict()) == list(reference.state_dict())  # no "module." prefix

    # Gradients are the mean of the per-rank gradients.
    x, y = _rank_batch(rank)
    fabric.backward(nn.functional.cross_entropy(model(x), y))
    nn.functional.cross_entropy(reference(x), y).backward()
    for synced, local in zip(model.parameters(), reference.parameters(), strict=True):
        expected = fabric.all_gather(local.grad).mean(dim=0)
        torch.testing.assert_close(synced.grad, expected, rtol=1e-6, atol=1e-7)
    norm = fabric.clip_gradients(model, optimizer, max_norm=0.05)
    assert norm is not None and _same_on_all_ranks(fabric, norm)
    optimizer.step()
    optimizer.zero_grad()

    # no_backward_sync: local gradients stay local until the synchronising step.
    for micro in range(2):
        accumulating = micro == 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            fabric.backward(model(x).sum())
        first_grad = next(model.parameters()).grad
        if accumulating:
            assert not _same_on_all_ranks(fabric, first_grad)
    assert _same_on_all_ranks(fabric, first_grad)
    optimizer.step()
    for param in model.parameters():
        assert _same_on_all_ranks(fabric, param)
    return {"rank": rank}


def test_ddp_gradients_weights_and_clipping() -> None:
    assert _fabric().launch(_train_checks) == {"rank": 0}


def _data_checks(fabric: Fabric) -> None:
    dataset = TensorDataset(torch.arange(21))
    for shuffle, drop_last in [(True, False), (False, False), (True, True)]:
        loader = fabric.setup_dataloaders(
            DataLoader(dataset, batch_size=4, shuffle=shuffle, drop_last=drop_last)
        )
        seen = [torch.cat([b[0] for b in loader]) for _ in range(2)]  # two epochs
        for epoch_indices in seen:
            gathered = fabric.all_gather(epoch_indices)
            mine, other = set(gathered[0].tolist()), set(gathered[1].tolist())
            if drop_last:
                # 10 samples per rank, then whole batches of 4 only: 8 per rank, none shared.
                assert not mine & other and len(mine) == len(other) == 8
            else:
                assert mine | other == set(range(21))  # covers the dataset (the last index is padded)
                assert len(mine & other) <= 1
        if shuffle:
            assert not torch.equal(seen[0], seen[1])  # set_epoch gives each epoch its own order
        assert len(loader) == (2 if drop_last else 3)


def test_dataloaders_are_sharded_disjointly_and_cover_the_data() -> None:
    _fabric().launch(_data_checks)


def _collective_checks(fabric: Fabric) -> None:
    rank = fabric.global_rank
    value = torch.tensor([1.0, 2.0]) * (rank + 1)
    assert fabric.all_reduce(value.clone(), reduce_op="sum").tolist() == [3.0, 6.0]
    assert fabric.all_reduce(value.clone(), reduce_op="mean").tolist() == [1.5, 3.0]
    assert fabric.all_reduce(value.clone(), reduce_op="max").tolist() == [2.0, 4.0]
    assert fabric.all_reduce(value.clone(), reduce_op="min").tolist() == [1.0, 2.0]
    # in place, as in Lightning: an integer mean keeps the dtype (truncated); in-place details are in
    # test_collectives_lightning.py
    assert fabric.all_reduce(torch.tensor(rank + 1), reduce_op="mean").item() == 1
    assert fabric.all_reduce(rank + 1, reduce_op="sum").item() == 3
    reduced = fabric.all_reduce({"a": value, "b": [torch.tensor(1.0)]}, reduce_op="sum")
    assert reduced["b"][0].item() == 2.0
    assert fabric.all_gather(torch.tensor(rank)).tolist() == [0, 1]
    uneven = fabric.all_gather(torch.arange(rank + 2))
    assert isinstance(uneven, list) and [t.tolist() for t in uneven] == [[0, 1], [0, 1, 2]]
    ragged = fabric.all_gather(torch.ones(rank + 1, 3))
    assert [tuple(t.shape) for t in ragged] == [(1, 3), (2, 3)]
    sent = fabric.broadcast(torch.arange(4.0) + 10 * rank if rank == 1 else None, src=1)
    assert sent.tolist() == [10.0, 11.0, 12.0, 13.0]
    assert fabric.broadcast({"epoch": rank}, src=0) == {"epoch": 0}
    with pytest.raises(ValueError, match="different kinds"):
        fabric.all_gather(torch.ones(2, dtype=torch.float32 if rank == 0 else torch.int64))
    order = []
    with fabric.rank_zero_first():
        order.append(time.monotonic())
    times = fabric.all_gather(torch.tensor(order[0], dtype=torch.float64))
    assert times[0] <= times[1]
    fabric.barrier()


def test_collectives() -> None:
    _fabric().launch(_collective_checks)


def _mixed_checks(fabric: Fabric) -> float:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _rank_batch(fabric.global_rank)
    for _ in range(3):
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    assert _same_on_all_ranks(fabric, model.module.weight)
    return float(fabric.strategy.amp.scaler.get_scale()) if fabric.strategy.amp.scaler else 0.0


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_under_ddp(precision: str) -> None:
    # fp16 autocast on the CPU needs the plugin: the name alone becomes bf16 there, as in Lightning.
    plugin = MixedPrecision("16-mixed", "cpu") if precision == "16-mixed" else precision
    scale = _fabric(precision=plugin).launch(_mixed_checks)
    assert (scale > 0) == (precision == "16-mixed")


def _fail_on_rank_one(fabric: Fabric) -> None:
    if fabric.global_rank == 1:
        raise ValueError("rank one cannot go on")
    fabric.barrier()  # rank 0 would wait here forever if the failure did not stop it
    time.sleep(60)


def test_a_failing_rank_stops_the_job_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        _fabric().launch(_fail_on_rank_one)
    assert time.monotonic() - start < 20
    assert info.value.rank == 1
    message = str(info.value)
    assert "ValueError: rank one cannot go on" in message and "_fail_on_rank_one" in message


def test_spawn_returns_rank_zero_result() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    assert fabric.launch(_rank_and_world, 5) == (0, 2, 5)


def _rank_and_world(fabric: Fabric, extra: int) -> tuple[int, int, int]:
    return fabric.global_rank, fabric.world_size, extra


class _WithTrainingStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self(inputs), targets)  # calls forward from inside the step


def _training_step(fabric: Fabric) -> float:
    model = fabric.setup(_WithTrainingStep())
    loss = model.training_step(_rank_batch(0))
    fabric.backward(loss)  # went through DDP: gradients are synchronised
    assert _same_on_all_ranks(fabric, model.module.net.weight.grad)
    return loss.item()


def test_training_step_that_calls_forward_runs_through_ddp() -> None:
    expected = _WithTrainingStep().training_step(_rank_batch(0)).item()
    assert _fabric().launch(_training_step) == pytest.approx(expected)


def _collect_garbage(fabric: Fabric) -> str:
    import gc

    gc.collect()
    return "collected"


@pytest.mark.timeout(60)
def test_forked_workers_do_not_collect_the_parents_garbage() -> None:
    # An unreachable TCPStore (as an earlier, failed launch can leave behind in a reference cycle)
    # owns a thread in this process; destroying it in a forked child would join a thread that does
    # not exist there and hang the worker.
    import gc

    from torch.distributed import TCPStore

    from handloom.launcher import find_free_port

    gc.disable()  # keep the garbage until the fork, as a busy program would
    try:
        store = TCPStore("127.0.0.1", find_free_port(), is_master=True, wait_for_workers=False)
        cycle: list[Any] = [store]
        cycle.append(cycle)
        del store, cycle
        assert _fabric().launch(_collect_garbage) == "collected"
    finally:
        gc.enable()


def _parallel_cpu_op(fabric: Fabric) -> float:
    matrix = torch.ones(512, 512)
    return float((matrix @ matrix).softmax(dim=-1).sum())  # large enough for torch's thread pool


@pytest.mark.timeout(60)
def test_forked_workers_run_cpu_ops_after_the_parent_used_its_thread_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GNU OpenMP is not fork-safe: a child forked after the parent ran a parallel region hangs in
    # its own first parallel region unless it runs single-threaded. An explicit OMP_NUM_THREADS
    # (as on many clusters) turns off handloom's own per-process thread limit.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    large = torch.randn(1024, 1024)
    (large @ large).softmax(dim=-1).sum()
    assert _fabric().launch(_parallel_cpu_op) == pytest.approx(512.0)


def _blocked_in_c_while_the_other_rank_fails(fabric: Fabric) -> None:
    import os
    from datetime import timedelta

    from torch.distributed import TCPStore

    if fabric.global_rank == 1:
        time.sleep(1.0)
        raise ValueError("rank 1 fails while rank 0 is blocked")
    # A call that holds no Python frame for 60 s and that rank 1's death does not interrupt.
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    store.wait(["a key nobody sets"], timedelta(seconds=60))


@pytest.mark.timeout(90)
def test_a_forked_worker_blocked_in_c_code_stops_at_once_when_another_rank_fails() -> None:
    # Forked workers inherit the agent's Python-level SIGTERM handler, which a worker blocked in C
    # would only run after the call returns; the agent would wait 30 s before its SIGKILL.
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="rank 1 fails while rank 0 is blocked"):
        _fabric().launch(_blocked_in_c_while_the_other_rank_fails)
    assert time.monotonic() - start < 15


def _stop_on_preemption(fabric: Fabric) -> int:
    import os
    import signal

    for step in range(1, 100):
        if step == 3 and fabric.global_rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler the first poll installed
        if fabric.preemption_requested():
            return step
    return -1


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"], ids=["default-group", "side-group"])
def test_preemption_on_one_rank_stops_every_rank_at_the_same_step(backend: str) -> None:
    # A backend other than plain gloo (NCCL on GPUs; "cpu:gloo" here) polls on a gloo group of
    # its own, created by the first poll.
    strategy = DDPStrategy(start_method="fork", process_group_backend=backend)
    results = Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(_stop_on_preemption)
    assert results == 3
