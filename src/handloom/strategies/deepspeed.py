"""``DeepSpeedStrategy``: Lightning's signature, refused at construction with the handloom equivalent.

handloom trains with PyTorch's own machinery, and the ZeRO stages have counterparts there:

==========================  ===============================================================
DeepSpeed                   handloom
==========================  ===============================================================
stage 3                     ``FSDPStrategy(sharding_strategy="FULL_SHARD")`` (``"fsdp"``)
stage 2                     ``FSDPStrategy(sharding_strategy="SHARD_GRAD_OP")``
stage 1, or no ZeRO         ``DDPStrategy()`` (``"ddp"``): FSDP2 has no optimizer-only sharding
offload (optimizer/params)  ``cpu_offload=True`` (FSDP2 offloads parameters, gradients and
                            optimizer state together)
NVMe offload                no counterpart; ``cpu_offload=True`` is the nearest
==========================  ===============================================================
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handloom.strategies.ddp import DDPStrategy
from handloom.strategies.parallel import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    import torch

    from handloom.accelerators import Accelerator
    from handloom.environments import ClusterEnvironment
    from handloom.plugins.precision import Precision

__all__ = ["DeepSpeedStrategy"]


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO, as Lightning names it: creating one raises a ValueError naming the
    handloom strategy that does the same with PyTorch's FSDP2 or DDP (see the module docstring).

    The arguments are Lightning's; only ``zero_optimization``, ``stage``, ``offload_optimizer``,
    ``offload_parameters``, the offload devices and ``config`` (its ``zero_optimization`` block)
    shape the suggestion.

    Raises:
        ValueError: Always.
    """

    DEEPSPEED_ENV_VAR = "PL_DEEPSPEED_CONFIG_PATH"

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        zero_optimization: bool = True,
        stage: int = 2,
        remote_device: str | None = None,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        offload_params_device: str = "cpu",
        nvme_path: str = "/local_nvme",
        params_buffer_count: int = 5,
        params_buffer_size: int = 100_000_000,
        max_in_cpu: int = 1_000_000_000,
        offload_optimizer_device: str = "cpu",
        optimizer_buffer_count: int = 4,
        block_size: int = 1048576,
        queue_depth: int = 8,
        single_submit: bool = False,
        overlap_events: bool = True,
        thread_count: int = 1,
        pin_memory: bool = False,
        sub_group_size: int = 1_000_000_000_000,
        contiguous_gradients: bool = True,
        overlap_comm: bool = True,
        allgather_partitions: bool = True,
        reduce_scatter: bool = True,
        allgather_bucket_size: int = 200_000_000,
        reduce_bucket_size: int = 200_000_000,
        zero_allow_untested_optimizer: bool = True,
        logging_batch_size_per_gpu: int | None = None,
        config: str | Path | dict[str, Any] | None = None,
        logging_level: int = logging.WARN,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        loss_scale: float = 0,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: int = 1,
        partition_activations: bool = False,
        cpu_checkpointing: bool = False,
        contiguous_memory_optimization: bool = False,
        synchronize_checkpoint_boundary: bool = False,
        load_full_weights: bool = False,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        exclude_frozen_parameters: bool = False,
    ) -> None:
        zero = _zero_settings(config)
        given, reason = deepspeed_replacement(
            stage=zero.get("stage", stage) if zero_optimization else 0,
            offload_optimizer=zero.get("offload_optimizer", offload_optimizer),
            offload_parameters=zero.get("offload_param", offload_parameters),
            nvme="nvme" in (remote_device, offload_params_device, offload_optimizer_device)
            or zero.get("nvme", False),
        )
        error = ValueError(f"{given} {reason}")
        error.given = given  # type: ignore[attr-defined]  # Fabric(strategy="deepspeed...") quotes the name
        raise error


def deepspeed_replacement(
    *, stage: int, offload_optimizer: bool, offload_parameters: bool, nvme: bool
) -> tuple[str, str]:
    """What a DeepSpeed configuration looks like as a call, and why it cannot run and what to use.

    Args:
        stage: The ZeRO stage (0 for no ZeRO).
        offload_optimizer: Optimizer state offloaded.
        offload_parameters: Parameters offloaded.
        nvme: Something offloaded to NVMe.

    Returns:
        ``(call, reason)``: e.g. ``("DeepSpeedStrategy(stage=3)", "cannot run: ... use ...")``.
    """
    offload = offload_optimizer or offload_parameters or nvme
    asked = [f"stage={stage}"]
    if offload_optimizer:
        asked.append("offload_optimizer=True")
    if offload_parameters:
        asked.append("offload_parameters=True")
    if nvme:
        asked.append("offload to NVMe")
    call = f"DeepSpeedStrategy({', '.join(asked)})"
    head = "cannot run: handloom has no DeepSpeed engine; it shards with PyTorch's FSDP2 instead."
    offload_arg = ", cpu_offload=True" if offload else ""
    nvme_note = " (NVMe offload has no FSDP2 counterpart: CPU memory is the nearest)" if nvme else ""
    if stage >= 3:
        named = "'fsdp_cpu_offload'" if offload else "'fsdp'"
        fsdp = f"FSDPStrategy(sharding_strategy='FULL_SHARD'{offload_arg})"
        return call, (
            f"{head} ZeRO stage 3 shards parameters, gradients and optimizer state, as FSDP2 does:"
            f" use strategy={fsdp} or strategy={named}{nvme_note}."
        )
    if stage == 2:
        fsdp = f"FSDPStrategy(sharding_strategy='SHARD_GRAD_OP'{offload_arg})"
        return call, (
            f"{head} For ZeRO stage 2 (sharded gradients and optimizer state), PyTorch's counterpart is"
            f" FSDP's SHARD_GRAD_OP: use strategy={fsdp}{nvme_note}."
        )
    return call, (
        f"{head} FSDP2 has no optimizer-only sharding (ZeRO stage 1): use strategy='ddp', which keeps the"
        " full optimizer state on each process, or FSDPStrategy(sharding_strategy='SHARD_GRAD_OP') to save"
        " memory."
    )


def _zero_settings(config: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """Stage and offload settings from a DeepSpeed config (a dict or a JSON file); ``{}`` if none."""
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            return {}
    if not isinstance(config, dict):
        return {}
    block = config.get("zero_optimization")
    if not isinstance(block, dict):
        return {}
    settings: dict[str, Any] = {}
    if isinstance(block.get("stage"), int):
        settings["stage"] = block["stage"]
    devices = []
    for key in ("offload_optimizer", "offload_param"):
        entry = block.get(key)
        if isinstance(entry, dict) and entry.get("device", "none") != "none":
            settings[key] = True
            devices.append(entry["device"])
    settings["nvme"] = "nvme" in devices
    return settings
