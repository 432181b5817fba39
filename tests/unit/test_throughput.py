"""Throughput, MFU, FLOP counting and the peak-FLOPs table, in one process."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from handloom import Fabric
from handloom.utilities import Throughput, ThroughputMonitor, get_available_flops, measure_flops
from handloom.utilities import flops as flops_module
from handloom.utilities import throughput as throughput_module

# A synthetic timeline: per update, the running totals and the FLOPs since the previous update.
# Rates over updates 0..2: 2 batches, 16 samples, 1600 items, 6e12 FLOPs (updates 1 and 2) in 4 s.
TIMELINE: list[dict[str, Any]] = [
    {"time": 1.0, "batches": 1, "samples": 8, "lengths": 800, "flops": 3e12},
    {"time": 3.0, "batches": 2, "samples": 16, "lengths": 1600, "flops": 3e12},
    {"time": 5.0, "batches": 3, "samples": 24, "lengths": 2400, "flops": 3e12},
    {"time": 6.0, "batches": 4, "samples": 40, "lengths": 4000, "flops": 4e12},
]


def test_rates_over_a_full_window_are_exact() -> None:
    throughput = Throughput(available_flops=10e12, window_size=3)
    for point in TIMELINE[:3]:
        throughput.update(**point)
    assert throughput.compute() == {
        "time": 5.0,
        "batches": 3,
        "samples": 24,
        "lengths": 2400,
        "device/batches_per_sec": 0.5,
        "device/samples_per_sec": 4.0,
        "device/items_per_sec": 400.0,
        "device/flops_per_sec": 1.5e12,
        "device/mfu": 0.15,  # flops_per_sec / available_flops
    }


def test_rates_appear_when_the_window_is_full_and_then_slide() -> None:
    throughput = Throughput(window_size=3)
    assert throughput.compute() == {}
    for point in TIMELINE[:2]:
        throughput.update(**point)
    assert throughput.compute() == {"time": 3.0, "batches": 2, "samples": 16, "lengths": 1600}

    for point in TIMELINE[2:]:
        throughput.update(**point)
    metrics = throughput.compute()
    # The window now holds updates 1..3: 2 batches, 24 samples, 7e12 FLOPs in 3 s.
    assert metrics["device/batches_per_sec"] == pytest.approx(2 / 3)
    assert metrics["device/samples_per_sec"] == pytest.approx(8.0)
    assert metrics["device/items_per_sec"] == pytest.approx(800.0)
    assert metrics["device/flops_per_sec"] == pytest.approx(7e12 / 3)
    assert "device/mfu" not in metrics  # no available_flops given

    throughput.reset()
    assert throughput.compute() == {}
    throughput.update(time=0.5, batches=0, samples=0)  # smaller than before reset(): allowed now


def test_global_rates_multiply_by_world_size_and_separator_is_used() -> None:
    throughput = Throughput(available_flops=10e12, world_size=4, window_size=2, separator=".")
    for point in TIMELINE[:2]:
        throughput.update(**point)
    metrics = throughput.compute()
    assert metrics["device.samples_per_sec"] == 4.0
    assert metrics["samples_per_sec"] == 16.0
    assert metrics["batches_per_sec"] == 2.0
    assert metrics["items_per_sec"] == 1600.0
    assert metrics["flops_per_sec"] == 6e12
    assert metrics["device.mfu"] == pytest.approx(0.15)


def test_optional_fields_only_when_given() -> None:
    throughput = Throughput(available_flops=10e12, window_size=2)
    throughput.update(time=1.0, batches=1, samples=4)
    throughput.update(time=2.0, batches=2, samples=8, flops=None)
    metrics = throughput.compute()
    assert metrics == {
        "time": 2.0,
        "batches": 2,
        "samples": 8,
        "device/batches_per_sec": 1.0,
        "device/samples_per_sec": 4.0,
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("time", 0.5, r"Throughput.update\(time=0.5\) is smaller than the time=1.0"),
        ("batches", 0, r"Throughput.update\(batches=0\) is smaller than the batches=1"),
        ("samples", 7, r"Throughput.update\(samples=7\) is smaller than the samples=8"),
        ("lengths", 799, r"Throughput.update\(lengths=799\) is smaller than the lengths=800"),
    ],
)
def test_decreasing_totals_are_errors_naming_the_value(field: str, value: float, message: str) -> None:
    throughput = Throughput()
    throughput.update(**TIMELINE[0])
    point = dict(TIMELINE[0], samples=8, batches=1)
    point[field] = value
    with pytest.raises(ValueError, match=message) as raised:
        throughput.update(**point)
    assert "running totals" in str(raised.value)


def test_invalid_values_are_errors() -> None:
    throughput = Throughput()
    with pytest.raises(ValueError, match=r"update\(batches=4, samples=2\) counts fewer samples"):
        throughput.update(time=1.0, batches=4, samples=2)
    with pytest.raises(ValueError, match=r"update\(samples=4, lengths=2\) counts fewer items"):
        throughput.update(time=1.0, batches=1, samples=4, lengths=2)
    with pytest.raises(ValueError, match=r"update\(flops=-1.0\) is negative"):
        throughput.update(time=1.0, batches=1, samples=4, flops=-1.0)
    with pytest.raises(ValueError, match=r"Throughput\(window_size=1\).*window_size=2 or more"):
        Throughput(window_size=1)
    with pytest.raises(ValueError, match=r"Throughput\(world_size=0\)"):
        Throughput(world_size=0)
    with pytest.raises(ValueError, match=r"Throughput\(available_flops=0\)"):
        Throughput(available_flops=0)


# --- measure_flops ------------------------------------------------------------------------------


def test_measure_flops_of_a_linear_layer_forward_and_backward() -> None:
    batch, n_in, n_out = 16, 8, 4
    model = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=True)
    forward = 2 * batch * n_in * n_out
    assert measure_flops(model, lambda: model(x)) == forward
    # Backward: the weight gradient and the input gradient, each as costly as the forward.
    assert measure_flops(model, lambda: model(x), lambda y: y.sum()) == 3 * forward
    # An input that needs no gradient gets none: only the weight gradient is computed.
    plain = torch.randn(batch, n_in)
    assert measure_flops(model, lambda: model(plain), lambda y: y.sum()) == 2 * forward
    # Counting leaves the model's gradients as they were.
    assert all(param.grad is None for param in model.parameters())


def test_measure_flops_on_a_meta_device_model() -> None:
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))

    with torch.device("meta"):
        meta_model = build()
    meta_x = torch.empty(5, 32, device="meta")
    meta_count = measure_flops(meta_model, lambda: meta_model(meta_x), lambda y: y.sum())
    model = build()
    count = measure_flops(model, lambda: model(torch.randn(5, 32)), lambda y: y.sum())
    forward = 2 * 5 * (32 * 64 + 64 * 16)
    # Backward: weight gradients for both layers, an input gradient for the second only.
    assert meta_count == count == forward + forward + 2 * 5 * 64 * 16
    assert all(param.device.type == "meta" and param.grad is None for param in meta_model.parameters())


def test_measure_flops_backward_needs_a_loss_with_grad() -> None:
    model = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"measure_flops\(loss_fn=...\).*does not require grad"):
        measure_flops(model, lambda: model(torch.randn(3, 4)), lambda y: y.sum())


# --- get_available_flops ------------------------------------------------------------------------

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Set ``name[0]`` to choose what ``torch.cuda.get_device_name`` reports."""
    name = ["NVIDIA H100 80GB HBM3"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name[0])
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield name
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize(
    ("device_name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5),
        ("NVIDIA H100 80GB HBM3", torch.float8_e4m3fn, 1979),
        ("NVIDIA H100 80GB HBM3", torch.float32, 67),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
        ("NVIDIA H100 PCIe", torch.float16, 756.5),
        ("NVIDIA H100 NVL", torch.bfloat16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.5),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5),
        ("NVIDIA GH200 480GB", torch.bfloat16, 990),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312),
        ("NVIDIA A100 80GB PCIe", torch.int8, 624),
        ("NVIDIA A100-SXM4-40GB", torch.float64, 19.5),
        ("NVIDIA A10", torch.bfloat16, 125),
        ("NVIDIA L4", torch.bfloat16, 121),
        ("NVIDIA L40", torch.bfloat16, 181.05),
        ("NVIDIA L40S", torch.bfloat16, 362.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
        ("Tesla V100-SXM2-16GB", torch.float16, 125),
        ("Tesla T4", torch.float16, 65),
        ("AMD Instinct MI300X", torch.bfloat16, 1307.4),
    ],
)
def test_dense_peaks_by_device_name_and_dtype(
    gpu_name: list[str], device_name: str, dtype: Any, tflops: float
) -> None:
    gpu_name[0] = device_name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_available_flops(CUDA, dtype) == pytest.approx(tflops * 1e12)


def test_float32_uses_the_tf32_peak_when_tf32_matmuls_are_allowed(gpu_name: list[str]) -> None:
    assert get_available_flops(CUDA, torch.float32) == pytest.approx(67e12)
    torch.set_float32_matmul_precision("high")
    assert get_available_flops(CUDA, torch.float32) == pytest.approx(494.5e12)


def test_unknown_gpu_warns_once_naming_it(gpu_name: list[str]) -> None:
    gpu_name[0] = "NVIDIA Imaginary X1"
    with pytest.warns(UserWarning, match="'NVIDIA Imaginary X1'") as record:
        assert get_available_flops(CUDA, torch.bfloat16) is None
    assert len(record) == 1
    assert "available_flops=" in str(record[0].message)


def test_dtype_without_a_figure_warns(gpu_name: list[str]) -> None:
    gpu_name[0] = "Tesla V100-SXM2-16GB"  # no bf16 tensor cores
    with pytest.warns(UserWarning, match=r"no peak for torch.bfloat16 on the GPU 'Tesla V100-SXM2-16GB'"):
        assert get_available_flops(CUDA, torch.bfloat16) is None


def test_cpu_has_no_peak_and_only_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.DEBUG, logger="handloom"):
            assert get_available_flops(torch.device("cpu"), torch.float32) is None
            assert get_available_flops("cpu", torch.bfloat16) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.DEBUG]


def test_every_table_entry_names_its_source() -> None:
    for peak in flops_module._PEAKS:
        assert "datasheet" in peak.source or "data sheet" in peak.source or "whitepaper" in peak.source
        assert peak.tflops and all(value > 0 for value in peak.tflops.values())
        # A typo guard: dense 16-bit tensor-core peaks are twice the TF32 ones (datasheets round).
        if "tf32" in peak.tflops and "bf16" in peak.tflops:
            assert peak.tflops["bf16"] == pytest.approx(2 * peak.tflops["tf32"], rel=0.02)


# --- ThroughputMonitor in one process ------------------------------------------------------------


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


def test_monitor_logs_metrics_with_steps() -> None:
    logger = RecordingLogger()
    fabric = Fabric(accelerator="cpu", loggers=[logger])
    monitor = ThroughputMonitor(fabric, window_size=2, available_flops=10e12)
    assert monitor.available_flops == 10e12
    for point in TIMELINE[:2]:
        monitor.update(**point)
    metrics = monitor.compute_and_log()
    assert metrics["device/samples_per_sec"] == 4.0 and metrics["device/mfu"] == pytest.approx(0.15)
    assert "samples_per_sec" not in metrics  # one process: no global keys
    monitor.compute_and_log()
    monitor.compute_and_log(step=10)
    monitor.compute_and_log()
    assert [step for _, step in logger.logged] == [0, 1, 10, 11]
    assert logger.logged[0][0] == metrics


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-true", torch.float16)],
)
def test_monitor_looks_up_the_peak_for_the_precision_dtype(
    monkeypatch: pytest.MonkeyPatch, precision: str, dtype: torch.dtype
) -> None:
    asked: list[tuple[torch.device, torch.dtype]] = []

    def fake(device: torch.device, dtype: torch.dtype) -> float:
        asked.append((device, dtype))
        return 100e12

    monkeypatch.setattr(throughput_module, "get_available_flops", fake)
    monitor = ThroughputMonitor(Fabric(accelerator="cpu", precision=precision))
    assert asked == [(torch.device("cpu"), dtype)]
    assert monitor.available_flops == 100e12


def test_monitor_on_cpu_has_no_mfu() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor = ThroughputMonitor(Fabric(accelerator="cpu", precision="bf16-mixed"), window_size=2)
    assert monitor.available_flops is None
    for point in TIMELINE[:2]:
        monitor.update(**point)
    assert "device/flops_per_sec" in monitor.compute() and "device/mfu" not in monitor.compute()


def test_monitor_before_launch_is_an_error() -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    with pytest.raises(RuntimeError, match=r"fabric.launch\(\)"):
        ThroughputMonitor(fabric, available_flops=1e12)
