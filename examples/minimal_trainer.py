"""A minimal, reusable Trainer built on Fabric: what a Trainer is once Fabric owns the infrastructure.

``Trainer.fit`` runs epochs of training and validation for any model that defines
``training_step(batch) -> loss`` and ``validation_step(batch) -> loss``. It accumulates gradients
over ``accumulation_steps`` micro-batches (``fabric.no_backward_sync`` skips DDP's all-reduce on
all but the last), clips them (``fabric.clip_gradients``), calls callbacks with
``fabric.call("on_train_batch_end", ...)`` and friends, and saves a checkpoint after every epoch
that ``fit(..., ckpt_path=...)`` resumes from (``fabric.save`` / ``fabric.load``). Everything
about devices, processes and precision is Fabric's, so the same Trainer runs on one CPU, several
processes or several GPUs.

The ``__main__`` part trains a small classifier on synthetic Gaussian clusters with it::

    python examples/minimal_trainer.py --epochs 2 --checkpoint-dir checkpoints
    python examples/minimal_trainer.py --epochs 4 --checkpoint-dir checkpoints --resume
    handloom run --accelerator cpu --devices 2 --strategy ddp examples/minimal_trainer.py

The last line printed is machine readable: ``FINAL {"val_loss": ..., "global_step": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from handloom import Fabric
from handloom.utilities import progress_bar


class TrainableModule(Protocol):
    """What the Trainer needs from a model, besides being an ``nn.Module``."""

    def training_step(self, batch: Any) -> torch.Tensor: ...

    def validation_step(self, batch: Any) -> torch.Tensor: ...


class Trainer:
    """Fit a model with Fabric: epochs, accumulation, clipping, validation, callbacks, checkpoints.

    Args:
        fabric: The Fabric to run on, already launched; its ``callbacks`` receive the hooks listed below.
        max_epochs: Train until this many epochs are done (counting those of a resumed run).
        accumulation_steps: Micro-batches per optimizer step.
        max_grad_norm: Clip the gradients' total norm to this before each step (``None``: no clipping).
        checkpoint_dir: Save ``epoch-NNNN.ckpt`` here after every epoch (``None``: never).

    Hooks (each called with the keyword arguments it accepts): ``on_train_batch_end(trainer,
    loss, batch_idx)``, ``on_optimizer_step(trainer, grad_norm)``, ``on_train_epoch_end(trainer,
    train_loss)``, ``on_validation_end(trainer, val_loss)``.
    """

    def __init__(
        self,
        fabric: Fabric,
        max_epochs: int = 1,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"Trainer(accumulation_steps={accumulation_steps}) must be 1 or more.")
        self.fabric = fabric
        self.max_epochs = max_epochs
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.checkpoint_dir = checkpoint_dir
        self.current_epoch = 0  # epochs done
        self.global_step = 0  # optimizer steps done

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader[Any],
        val_loader: DataLoader[Any] | None = None,
        ckpt_path: Path | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` (which must define ``training_step`` and ``validation_step``).

        Returns:
            The last epoch's ``train_loss`` and ``val_loss`` (``None`` if nothing ran).
        """
        fabric = self.fabric
        model, optimizer = fabric.setup(model, optimizer)  # training_step goes through DDP like forward
        train_loader = fabric.setup_dataloaders(train_loader)
        if val_loader is not None:
            val_loader = fabric.setup_dataloaders(val_loader)
        if ckpt_path is not None:
            self.load_checkpoint(ckpt_path, model, optimizer)

        metrics: dict[str, Any] = {"train_loss": None, "val_loss": None}
        while self.current_epoch < self.max_epochs:
            metrics["train_loss"] = self.train_epoch(model, optimizer, train_loader)
            self.current_epoch += 1
            fabric.call("on_train_epoch_end", trainer=self, train_loss=metrics["train_loss"])
            if val_loader is not None:
                metrics["val_loss"] = self.validate(model, val_loader)
            val_text = "" if metrics["val_loss"] is None else f" | val loss {metrics['val_loss']:.4f}"
            fabric.print(
                f"epoch {self.current_epoch}/{self.max_epochs} | step {self.global_step}"
                f" | train loss {metrics['train_loss']:.4f}{val_text}"
            )
            if self.checkpoint_dir is not None:
                self.save_checkpoint(
                    self.checkpoint_dir / f"epoch-{self.current_epoch:04d}.ckpt", model, optimizer
                )
        return metrics

    def train_epoch(self, model: Any, optimizer: Any, train_loader: Iterable[Any]) -> float:
        """One pass over the training data; returns the mean loss over all processes."""
        fabric = self.fabric
        model.train()
        total = torch.tensor(0.0, device=fabric.device)
        num_batches = 0
        for batch_idx, batch in enumerate(progress_bar(train_loader, fabric, desc="training")):
            is_accumulating = (batch_idx + 1) % self.accumulation_steps != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):
                loss = model.training_step(batch)
                fabric.backward(loss / self.accumulation_steps)
            total += loss.detach()
            num_batches += 1
            fabric.call("on_train_batch_end", trainer=self, loss=loss.detach(), batch_idx=batch_idx)
            if not is_accumulating:
                self._optimizer_step(model, optimizer)
        if num_batches % self.accumulation_steps:  # an incomplete accumulation at the end still counts
            self._optimizer_step(model, optimizer)
        return float(fabric.all_reduce(total / max(num_batches, 1), reduce_op="mean").item())

    def _optimizer_step(self, model: Any, optimizer: Any) -> None:
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = self.fabric.clip_gradients(model, optimizer, max_norm=self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        self.global_step += 1
        self.fabric.call("on_optimizer_step", trainer=self, grad_norm=grad_norm)

    @torch.no_grad()
    def validate(self, model: Any, val_loader: Iterable[Any]) -> float:
        """Mean validation loss over all processes."""
        fabric = self.fabric
        model.eval()
        total = torch.tensor(0.0, device=fabric.device)
        num_batches = torch.tensor(0, device=fabric.device)
        for batch in val_loader:
            total += model.validation_step(batch)
            num_batches += 1
        model.train()
        total, num_batches = fabric.all_reduce((total, num_batches), reduce_op="sum")
        val_loss = float((total / num_batches).item())
        fabric.call("on_validation_end", trainer=self, val_loss=val_loss)
        return val_loss

    def save_checkpoint(self, path: Path, model: Any, optimizer: Any) -> None:
        """Every process calls this: DDP writes from rank 0, sharded strategies from every rank.

        ``fabric.save`` returns once the checkpoint is complete, on every process."""
        state = {
            "model": model,
            "optimizer": optimizer,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
        }
        self.fabric.save(path, state)

    def load_checkpoint(self, path: Path, model: Any, optimizer: Any) -> None:
        state = {"model": model, "optimizer": optimizer, "epoch": 0, "global_step": 0}
        self.fabric.load(path, state)
        self.current_epoch, self.global_step = state["epoch"], state["global_step"]
        self.fabric.print(
            f"resumed from {path}: {self.current_epoch} epoch(s), {self.global_step} steps done"
        )


# --- using it ----------------------------------------------------------------------------------------
# Used when the script launches itself; under `handloom run` the launcher's flags decide instead.
STANDALONE_DEFAULTS = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


class Classifier(nn.Module):
    """A small MLP with the two methods the Trainer calls."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def validation_step(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)


class History:
    """A callback that records what the Trainer reports."""

    def __init__(self) -> None:
        self.batch_losses: list[float] = []
        self.grad_norms: list[float] = []
        self.val_losses: list[float] = []

    def on_train_batch_end(self, loss: torch.Tensor) -> None:
        self.batch_losses.append(loss.item())

    def on_optimizer_step(self, grad_norm: torch.Tensor | None) -> None:
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.item())

    def on_validation_end(self, val_loss: float) -> None:
        self.val_losses.append(val_loss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size per process")
    parser.add_argument("--accumulation-steps", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-samples", type=int, default=1280)
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="save a checkpoint after each epoch"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="resume from PATH, or from the newest checkpoint in --checkpoint-dir when no PATH is given",
    )
    fabric_group = parser.add_argument_group("Fabric (under `handloom run`, the launcher's flags apply)")
    fabric_group.add_argument("--accelerator", default=None, help="default: cpu")
    fabric_group.add_argument("--devices", type=int, default=None, help="default: 2")
    fabric_group.add_argument("--strategy", default=None, help="default: ddp")
    fabric_group.add_argument("--precision", default=None, help="default: 32-true")
    args = parser.parse_args(argv)
    if args.resume == "latest" and args.checkpoint_dir is None:
        parser.error("--resume without a PATH resumes from --checkpoint-dir; pass --checkpoint-dir DIR too.")
    return args


def build_fabric(args: argparse.Namespace, callbacks: list[Any]) -> Fabric:
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
    return Fabric(
        callbacks=callbacks, **{name: value for name, value in options.items() if value is not None}
    )


def make_dataset(
    num_samples: int, num_classes: int = 4, num_features: int = 16, seed: int = 0
) -> TensorDataset:
    """Gaussian clusters, one per class. Every rank builds the same data from the same seed."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=generator)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
    return TensorDataset(inputs, targets)


def newest_checkpoint(checkpoint_dir: Path) -> Path:
    found = sorted(checkpoint_dir.glob("epoch-*.ckpt"))
    if not found:
        raise FileNotFoundError(
            f"--resume found no checkpoint in {str(checkpoint_dir)!r}. Train with --checkpoint-dir first."
        )
    return found[-1]


def main(args: argparse.Namespace) -> None:
    history = History()
    fabric = build_fabric(args, callbacks=[history])
    fabric.launch()
    fabric.seed_everything(args.seed)

    dataset = make_dataset(args.num_samples, seed=args.seed)
    num_val = args.num_samples // 5
    train_set, val_set = torch.utils.data.random_split(
        dataset, [len(dataset) - num_val, num_val], generator=torch.Generator().manual_seed(args.seed)
    )
    model = Classifier(num_features=dataset.tensors[0].shape[1], num_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = Trainer(
        fabric,
        max_epochs=args.epochs,
        accumulation_steps=args.accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        checkpoint_dir=args.checkpoint_dir,
    )
    ckpt_path = None
    if args.resume is not None:
        ckpt_path = newest_checkpoint(args.checkpoint_dir) if args.resume == "latest" else Path(args.resume)
    metrics = trainer.fit(
        model,
        optimizer,
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(val_set, batch_size=args.batch_size),
        ckpt_path=ckpt_path,
    )

    result = {
        **metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "resumed_from": None if ckpt_path is None else str(ckpt_path),
        "first_batch_loss": history.batch_losses[0] if history.batch_losses else None,
        "num_train_batches_seen": len(history.batch_losses),
        "grad_norms_seen": len(history.grad_norms),
        "max_grad_norm_seen": max(history.grad_norms, default=None),
        "val_losses": history.val_losses,
        "world_size": fabric.world_size,
    }
    fabric.print("FINAL " + json.dumps(result))


if __name__ == "__main__":
    main(parse_args())
