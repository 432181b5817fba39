"""Sharding building blocks that need no processes: policies, layouts, option checks, optimizer keys,
clipping and meta-device materialisation."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy

from handloom import Fabric
from handloom.devices import HardwareProbe
from handloom.options import FabricOptions, resolve_plan
from handloom.sharding import grads, layout, materialize, optim
from handloom.sharding.policy import resolve_module_policy, select_modules
from handloom.strategies import FSDPStrategy, ModelParallelStrategy


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.LayerNorm(8))


# --- policies -----------------------------------------------------------------------------------
def test_class_set_policy_picks_children_before_parents_and_never_the_root() -> None:
    model = _net()
    policy = resolve_module_policy(
        {nn.Linear, nn.Sequential}, owner="FSDPStrategy", option="auto_wrap_policy"
    )
    assert policy is not None
    picked = select_modules(model, policy, include_root=False)
    assert picked == [model[0], model[1][0], model[1]]  # post-order; the root Sequential is left out


def test_callable_policies_one_argument_and_fsdp1_style() -> None:
    model = _net()
    one_arg = resolve_module_policy(lambda m: isinstance(m, nn.LayerNorm), owner="F", option="p")
    assert one_arg is not None and select_modules(model, one_arg, include_root=False) == [model[2]]
    wrap = resolve_module_policy(ModuleWrapPolicy({nn.Linear}), owner="F", option="p")
    assert wrap is not None and wrap.fsdp1_style
    assert select_modules(model, wrap, include_root=False) == [model[0], model[1][0]]
    size = resolve_module_policy(
        functools.partial(size_based_auto_wrap_policy, min_num_params=50), owner="F", option="p"
    )
    assert size is not None
    assert select_modules(model, size, include_root=False) == [model[1][0]]  # 72 params; model[0] has 40


@pytest.mark.parametrize("bad", ["Linear", {nn.Linear, "x"}, 3, set()])
def test_bad_policies_are_named(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"FSDPStrategy\(auto_wrap_policy="):
        FSDPStrategy(auto_wrap_policy=bad)
    with pytest.raises(TypeError, match=r"activation_checkpointing_policy="):
        FSDPStrategy(activation_checkpointing_policy=bad)


# --- layouts and options ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "mesh", "world", "nodes", "expected"),
    [
        ("FULL_SHARD", None, 4, 1, ((4,), True)),
        ("SHARD_GRAD_OP", None, 4, 1, ((4,), False)),
        ("NO_SHARD", None, 4, 1, ((4, 1), False)),
        ("HYBRID_SHARD", None, 8, 2, ((2, 4), True)),
        ("HYBRID_SHARD", (4, 2), 8, 2, ((4, 2), True)),
        ("_HYBRID_SHARD_ZERO2", None, 8, 2, ((2, 4), False)),
        ("FULL_SHARD", (2, 2), 4, 1, ((2, 2), True)),
    ],
)
def test_sharding_layouts(strategy: str, mesh: Any, world: int, nodes: int, expected: Any) -> None:
    result = layout.resolve_layout(strategy, mesh, world, nodes)
    assert (result.mesh_shape, result.reshard_after_forward) == expected
    assert len(result.mesh_dim_names) == len(result.mesh_shape)


def test_sharding_strategy_accepts_enum_and_any_case() -> None:
    from torch.distributed.fsdp import ShardingStrategy

    assert FSDPStrategy(sharding_strategy=ShardingStrategy.SHARD_GRAD_OP).sharding_strategy == "SHARD_GRAD_OP"
    assert FSDPStrategy(sharding_strategy="hybrid_shard").sharding_strategy == "HYBRID_SHARD"


def test_bad_fsdp_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"sharding_strategy='HALF_SHARD'.*FULL_SHARD"):
        FSDPStrategy(sharding_strategy="HALF_SHARD")
    with pytest.raises(ValueError, match=r"state_dict_type='distributed'.*'sharded'"):
        FSDPStrategy(state_dict_type="distributed")
    with pytest.raises(ValueError, match=r"device_mesh=\(2, 0\)"):
        FSDPStrategy(device_mesh=(2, 0))
    with pytest.raises(TypeError, match=r"FSDPStrategy\(limit_all_gather=...\)"):
        FSDPStrategy(limit_all_gather=True)
    with pytest.raises(TypeError, match=r"mixed_precision='bf16'"):
        FSDPStrategy(mixed_precision="bf16")
    with pytest.warns(UserWarning, match="limit_all_gathers"):
        FSDPStrategy(limit_all_gathers=True)  # an FSDP1 option, accepted for compatibility
    strategy = FSDPStrategy(sharding_strategy="NO_SHARD", device_mesh=(2, 2))
    with pytest.raises(ValueError, match=r"NO_SHARD.*device_mesh=\(2, 2\)"):
        Fabric(accelerator="cpu", devices=4, strategy=strategy)
    with pytest.raises(ValueError, match=r"device_mesh=\(2, 2\)\) describes 4 processes, but the job has 2"):
        Fabric(accelerator="cpu", devices=2, strategy=FSDPStrategy(device_mesh=(2, 2)))


def test_fsdp_names_resolve() -> None:
    probe = HardwareProbe()
    plan = resolve_plan(FabricOptions(accelerator="cpu", devices=2, strategy="fsdp"), {}, probe)
    assert isinstance(plan.strategy, FSDPStrategy) and plan.launch == "script"
    offload = resolve_plan(
        FabricOptions(accelerator="cpu", devices=2, strategy="fsdp_cpu_offload"), {}, probe
    )
    assert isinstance(offload.strategy, FSDPStrategy) and offload.strategy.cpu_offload is True


def test_model_parallel_sizes() -> None:
    from handloom.strategies.model_parallel import resolve_mesh_sizes

    assert resolve_mesh_sizes(None, None, 8, 2) == (2, 4)
    assert resolve_mesh_sizes(None, 2, 8, 1) == (4, 2)
    assert resolve_mesh_sizes(4, None, 8, 1) == (4, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        resolve_mesh_sizes(None, 3, 8, 1)
    with pytest.raises(ValueError, match="must be a positive integer"):
        ModelParallelStrategy(lambda m, mesh: m, data_parallel_size="two")  # type: ignore[arg-type]


# --- optimizer state keys -----------------------------------------------------------------------
def test_optimizer_keys_round_trip_by_name_and_position() -> None:
    model = _net()
    optimizer = torch.optim.Adam(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.1}]
    )
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    plain = optimizer.state_dict()
    named = optim.to_name_keyed(plain, optimizer, model)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.0.weight", "1.0.bias"}
    assert named["param_groups"][1]["params"] == ["1.0.weight", "1.0.bias"] and optim.is_name_keyed(named)
    back = optim.to_position_keyed(named, optimizer, model)
    assert not optim.is_name_keyed(back)
    assert back["param_groups"] == plain["param_groups"]
    for key, value in plain["state"].items():
        torch.testing.assert_close(back["state"][key]["exp_avg"], value["exp_avg"])


def test_repointing_an_optimizer_at_another_model_is_refused() -> None:
    model, other = _net(), nn.Linear(3, 3)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter of shape \(3, 3\) that is not in the model"):
        optim.repoint_optimizer(optimizer, optim.parameter_names(model), model, "FSDPStrategy")


# --- clipping and materialisation ---------------------------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_on_plain_tensors_equals_torch(norm_type: float) -> None:
    torch.manual_seed(0)
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    ours = grads.clip_grad_norm(list(a.parameters()), 0.5, norm_type, True)
    theirs = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5, norm_type=norm_type)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_materialize_equals_reset_parameters_in_module_order() -> None:
    with torch.device("meta"):
        model = _net()
    torch.manual_seed(5)
    missing = materialize.materialize(model, torch.device("cpu"))
    reference = _net()
    torch.manual_seed(5)
    for module in reference.modules():
        if next(module.parameters(recurse=False), None) is not None:
            module.reset_parameters()  # type: ignore[operator]
    assert missing == []
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_materialize_lists_modules_without_reset_parameters() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), Scale())
    assert materialize.materialize(model, torch.device("cpu")) == ["1"]
    assert not materialize.has_meta_tensors(model)


def test_materialize_uses_the_private_reset_of_torch_attention() -> None:
    # nn.MultiheadAttention has _reset_parameters only; the article's decoder layer holds two of them.
    with torch.device("meta"):
        layer = nn.TransformerDecoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    torch.manual_seed(0)
    assert materialize.materialize(layer, torch.device("cpu")) == []
    weight = layer.self_attn.in_proj_weight
    assert torch.isfinite(weight).all() and 0 < weight.abs().max() <= (6 / (8 + 24)) ** 0.5  # xavier bound


def _rope(seq_len: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]
    return torch.cos(positions * torch.arange(1, dim + 1, device=device, dtype=torch.float32))


class RopeNet(nn.Module):
    """Like litgpt's GPT: ``reset_parameters`` on the root only rebuilds (reassigns) its buffers."""

    def __init__(self, seq_len: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.seq_len = seq_len
        self.register_buffer("cos", _rope(seq_len, 4), persistent=False)

    def reset_parameters(self) -> None:
        self.cos = _rope(self.seq_len, 4, device=self.cos.device)  # a new tensor, not an in-place copy
        # A buffer of another shape and dtype, and one registered under a new name.
        self.register_buffer("steps", torch.arange(self.seq_len + 1, dtype=torch.int64), persistent=False)
        if not hasattr(self, "sin"):
            self.register_buffer("sin", torch.sin(self.cos), persistent=False)


def test_materialize_keeps_tensors_that_reset_parameters_assigns() -> None:
    torch.manual_seed(3)
    eager = RopeNet()
    eager.reset_parameters()
    with torch.device("meta"):
        model = RopeNet()
        model.register_buffer("steps", torch.zeros(2, dtype=torch.float16), persistent=False)
    torch.manual_seed(3)
    allocated: list[tuple[int, ...]] = []
    original = materialize._empty_like

    def counting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type != "meta":
            allocated.append(tuple(tensor.shape))
        return original(tensor, device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(materialize, "_empty_like", counting)
        assert materialize.materialize(model, torch.device("cpu")) == []
    assert not materialize.has_meta_tensors(model)
    for name, expected in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], expected, msg=name)
    for name in ("cos", "sin", "steps"):
        torch.testing.assert_close(getattr(model, name), getattr(eager, name), msg=name)
    assert model.steps.dtype == torch.int64 and model.steps.shape == (7,)
    # The root's reset touched only its own buffer: no full-size copy of the embedding or head.
    assert allocated == [(6, 4), (10, 4), (10, 4), (10,)]
