"""Train with checkpoints that survive a crash, and resume exactly where the run stopped.

A small MLP classifier (with dropout and noise augmentation, so the random streams matter) learns
Gaussian clusters from a shuffled DataLoader, with AdamW and a cosine learning-rate schedule.
Every ``--save-every`` steps the run saves a checkpoint into ``--checkpoint-dir`` (keeping the
newest ``--keep-last``); when it starts and finds a checkpoint there, it resumes from the newest
complete one. The state holds the set-up dataloader, a ``RandomState`` and the precision runner
(the gradient scaler of ``16-mixed``) beside the model and optimizer, so every rank's loader
position and random streams are saved and restored: a run that is killed and restarted ends with
exactly the same weights as one that never stopped.

Try it (one CPU process by default)::

    python examples/resumable_training.py --stop-after 130       # "crashes" after step 130
    python examples/resumable_training.py                        # resumes from step 125, ends at 200

    handloom run --accelerator cpu --devices 2 --strategy ddp examples/resumable_training.py
    handloom run --accelerator cpu --devices 2 --strategy fsdp examples/resumable_training.py

Compare the ``checksum`` of the last line with a run into an empty ``--checkpoint-dir`` that was
never stopped: it is the same. ``--stop-after N`` SIGKILLs the process right after step N (after
its save, if it has one), like a lost node; ``--crash-rank R`` kills rank R alone.
``--async-save`` writes checkpoints in the background. A SIGTERM (``kill PID``, a scheduler's
stop, Slurm's ``--signal`` warning) makes every rank save at the same step and exit cleanly.

Elastic restarts resume on their own: the killed run is restarted by the launcher and picks up
from the newest complete checkpoint, ending with the same weights::

    handloom run --accelerator cpu --devices 2 --max-restarts 1 examples/resumable_training.py \
        --stop-after 130 --crash-rank 1

The last line printed is machine readable: ``FINAL {"step": ..., "loss": ..., "checksum": ...}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.checkpoint import CheckpointFolder, RandomState

# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps of the whole run")
    parser.add_argument("--save-every", type=int, default=25, help="save a checkpoint every N steps")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/resumable"))
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="simulate a crash: SIGKILL after step N (first attempt only; see --max-restarts)",
    )
    parser.add_argument(
        "--crash-rank", type=int, default=None, metavar="R", help="with --stop-after: only rank R dies"
    )
    parser.add_argument("--final-weights", type=Path, default=None, help="torch.save the final weights here")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per process and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-samples", type=int, default=2048, help="size of the synthetic dataset")
    parser.add_argument("--log-every", type=int, default=50)
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 1")
    fabric_group.add_argument("--strategy", default=None, help="default: auto (ddp, fsdp, ...)")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    return parser.parse_args(argv)


def build_fabric(args: argparse.Namespace) -> Fabric:
    """Create Fabric from the flags given here; ``handloom run`` supplies the ones left out."""
    options = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "precision": args.precision,
    }
    if os.environ.get("HANDLOOM_CLI_USED") != "1":
        options = {
            name: STANDALONE_DEFAULTS.get(name) if value is None else value for name, value in options.items()
        }
    return Fabric(**{name: value for name, value in options.items() if value is not None})


def make_dataset(num_samples: int, num_classes: int = 4, num_features: int = 16) -> TensorDataset:
    """Gaussian clusters, one per class. Every rank builds the same data from the same seed."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(num_classes, num_features, generator=generator)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(inputs, targets)


def build_model(num_features: int = 16, num_classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Linear(num_features, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def full_weights(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights as full CPU tensors (under FSDP this gathers the shards: call it on every rank)."""
    weights = {}
    for name, value in model.state_dict().items():
        # A DTensor (FSDP, tensor parallel) holds this rank's shard; full_tensor() gathers it.
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        weights[name] = full.detach().cpu()
    return weights


def checksum(weights: dict[str, torch.Tensor]) -> str:
    """A hash of the exact bytes of every weight: equal only if the runs are equal bit for bit."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def crash(fabric: Fabric, step: int) -> None:
    """Be killed: no clean-up, no exit hooks, no waiting for a background save."""
    print(f"[rank {fabric.global_rank}] simulated crash after step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main(args: argparse.Namespace) -> None:
    fabric = build_fabric(args)
    fabric.launch()  # with strategy="ddp" this re-runs the script once per device; the rest runs there
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples)
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    train_loader = fabric.setup_dataloaders(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.max_steps)
    criterion = nn.CrossEntropyLoss()

    # Resume: the objects are restored in place; "step" is written back into `state`. With the
    # loader in the state it continues mid-epoch in the same shuffled order; with RandomState each
    # rank's random streams are those of the save; "precision" carries the gradient scaler.
    folder = CheckpointFolder(args.checkpoint_dir, keep_last=args.keep_last)
    state: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "loader": train_loader,
        "rng": RandomState(),
        "precision": fabric.strategy.precision,
        "step": 0,
    }
    latest = folder.resume(fabric, state)  # every rank loads the newest checkpoint rank 0 found
    if latest is not None:
        fabric.print(f"Resumed from {latest} at step {state['step']}")
    resumed_from: int = state["step"]
    # Under `handloom run --max-restarts N` the restarted workers run on past --stop-after.
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    step = resumed_from

    if step >= args.max_steps:
        fabric.print(f"Already at step {step}: raise --max-steps, or use an empty --checkpoint-dir.")
    loss = torch.tensor(math.nan, device=fabric.device)
    while step < args.max_steps:
        for inputs, targets in train_loader:
            noisy = inputs + 0.1 * torch.randn_like(inputs)  # augmentation: draws from the torch RNG
            optimizer.zero_grad()
            loss = criterion(model(noisy), targets)
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % args.log_every == 0:
                fabric.print(f"step {step} | loss {loss.item():.4f} | lr {scheduler.get_last_lr()[0]:.2e}")

            # SIGTERM (or Slurm's --signal warning) on any rank: every rank sees True at this step.
            preempted = fabric.preemption_requested()
            if step % args.save_every == 0 or step == args.max_steps or preempted:
                state["step"] = step
                # Every rank calls save. Single device/DDP: rank 0 writes one file; FSDP: every rank
                # writes its shards. It returns once the checkpoint is complete.
                fabric.save(folder.path(step), state, async_save=args.async_save and not preempted)
                if fabric.is_global_zero:
                    folder.prune()  # keep the newest --keep-last, remove leftovers of interrupted saves
            if preempted:
                fabric.print(f"Preempted: saved step {step} to {folder.path(step)}; run again to resume.")
                return
            if step == args.stop_after and first_attempt and args.crash_rank in (None, fabric.global_rank):
                crash(fabric, step)
            if step >= args.max_steps:
                break

    final_loss = fabric.all_reduce(loss.detach(), reduce_op="mean").item()
    weights = full_weights(model)
    if args.final_weights is not None and fabric.is_global_zero:
        torch.save(weights, args.final_weights)
    result = {
        "step": step,
        "resumed_from": resumed_from,
        "loss": final_loss,
        "checksum": checksum(weights),
        "param_sum": repr(sum(w.double().sum().item() for w in weights.values())),
        "checkpoints": [path.name for path in folder.checkpoints()],
        "world_size": fabric.world_size,
        "strategy": type(fabric.strategy).__name__,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
