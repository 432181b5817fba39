"""Names of the variables ``handloom run`` writes into its workers' environment."""

from __future__ import annotations

CLI_USED = "HANDLOOM_CLI_USED"
CLI_ACCELERATOR = "HANDLOOM_ACCELERATOR"
CLI_STRATEGY = "HANDLOOM_STRATEGY"
CLI_DEVICES = "HANDLOOM_DEVICES"
CLI_NUM_NODES = "HANDLOOM_NUM_NODES"
CLI_PRECISION = "HANDLOOM_PRECISION"

# Constructor argument name -> the variable that carries the CLI's value for it.
CLI_OPTION_VARS: dict[str, str] = {
    "accelerator": CLI_ACCELERATOR,
    "strategy": CLI_STRATEGY,
    "devices": CLI_DEVICES,
    "num_nodes": CLI_NUM_NODES,
    "precision": CLI_PRECISION,
}

ACCELERATOR_NAMES: tuple[str, ...] = ("cpu", "cuda", "gpu", "mps", "auto")
# Strategy names `handloom run` accepts: the ones that let torchrun create the processes.
CLI_STRATEGY_NAMES: tuple[str, ...] = ("auto", "ddp", "ddp_find_unused_parameters_true", "dp", "fsdp")
