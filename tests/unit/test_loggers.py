"""Loggers and callbacks in one process: files read back the way users read them."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

from handloom import Fabric
from handloom.loggers import CSVLogger, Logger, TensorBoardLogger

REPO = Path(__file__).resolve().parents[2]


def read_csv(path: Path | str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_hparams(log_dir: str) -> tuple[dict[str, Any], list[str]]:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params: dict[str, Any] = {}
    for key, value in start.session_start_info.hparams.items():
        params[key] = getattr(value, value.WhichOneof("kind"))
    return params, [m.name.tag for m in experiment.experiment.metric_infos]


# --- CSV --------------------------------------------------------------------------------------------
def test_csv_rows_header_growth_and_flush_cadence(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="exp", flush_logs_every_n_steps=3)
    assert logger.root_dir == str(tmp_path)  # the argument as given, as Lightning's root_dir
    assert logger.log_dir == str(tmp_path / "exp" / "version_0")
    metrics_file = Path(logger.log_dir) / "metrics.csv"
    running = torch.tensor(1.0)
    logger.log_metrics({"loss": running}, step=10)
    running += 100.0  # changed in place after logging: the logged value must not change
    logger.log_metrics({"loss": 0.5}, step=20)
    assert not metrics_file.exists()  # buffered: 2 rows < 3
    logger.log_metrics({"loss": torch.tensor(0.25), "acc": torch.tensor(0.75)}, step=30)  # new key
    assert metrics_file.exists()  # flushed after 3 rows, whatever the step numbers
    logger.log_metrics({"val": {"loss": 2, "acc": True}})  # nested: "val/loss"; step None: row number
    logger.finalize("success")
    header, rows = read_csv(metrics_file)
    assert header == ["step", "loss", "acc", "val/loss", "val/acc"]
    assert [r["step"] for r in rows] == ["10", "20", "30", "3"]
    assert [r["loss"] for r in rows] == ["1.0", "0.5", "0.25", ""]
    assert rows[2]["acc"] == "0.75" and rows[3]["val/loss"] == "2" and rows[3]["val/acc"] == "True"
    # Logging after finalize keeps working and appends.
    logger.log_metrics({"loss": 0.125}, step=40)
    logger.finalize("success")
    assert read_csv(metrics_file)[1][-1]["loss"] == "0.125"


def test_csv_step_argument_wins_over_a_metric_named_step(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, version=0)
    logger.log_metrics({"step": 999, "loss": 1.0}, step=5)
    logger.log_metrics({"step": torch.tensor(7.0), "loss": 0.5})  # no argument: the row number
    logger.experiment.log_metrics({"step": 3, "loss": 0.25}, step=6)  # the writer's own path
    logger.finalize("success")
    header, rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    assert header == ["step", "loss"]
    assert [(r["step"], r["loss"]) for r in rows] == [("6", "0.25"), ("5", "1.0"), ("1", "0.5")]


def test_csv_versions_names_and_prefix(tmp_path: Path) -> None:
    (tmp_path / "exp" / "version_0").mkdir(parents=True)
    (tmp_path / "exp" / "version_3").mkdir()
    (tmp_path / "exp" / "version_x").mkdir()
    (tmp_path / "exp" / "version_9").touch()  # a file, not a version directory
    assert CSVLogger(tmp_path, name="exp").version == 4
    assert CSVLogger(tmp_path, name="exp").version == 5  # the previous one reserved version_4
    named = CSVLogger(tmp_path, name="", version="run-a", prefix="train")
    assert named.log_dir == str(tmp_path / "run-a") and named.name == ""
    named.log_metrics({"loss": 1.0}, step=0)
    named.save()
    assert read_csv(tmp_path / "run-a" / "metrics.csv")[0] == ["step", "train-loss"]
    assert CSVLogger(tmp_path, version=7).log_dir == str(tmp_path / "lightning_logs" / "version_7")


def test_csv_existing_metrics_file_is_continued_not_deleted(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"loss": 1.0}, step=0)
    first.finalize("success")
    again = CSVLogger(tmp_path, version=0)
    with pytest.warns(UserWarning, match="already holds 1 rows"):
        again.log_metrics({"loss": 0.5, "lr": 0.1}, step=1)
        again.finalize("success")
    header, rows = read_csv(Path(again.log_dir) / "metrics.csv")
    assert header == ["step", "loss", "lr"] and [r["loss"] for r in rows] == ["1.0", "0.5"]
    assert CSVLogger(tmp_path).version == 1  # an automatic version never reuses an existing one


def test_csv_hyperparams_json_merges(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams(argparse.Namespace(lr=0.1, layers=[4, 8], dtype=torch.float32))
    logger.log_hyperparams({"lr": 0.01, "optimizer": {"name": "adam"}})
    saved = json.loads((Path(logger.log_dir) / "hparams.json").read_text())
    assert saved == {"lr": 0.01, "layers": [4, 8], "dtype": "torch.float32", "optimizer": {"name": "adam"}}
    with pytest.raises(TypeError, match="log_hyperparams got int"):
        logger.log_hyperparams(3)


def test_bad_values_and_arguments_are_named(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(2,\) for 'acc'"):
        logger.log_metrics({"acc": torch.ones(2)})
    with pytest.raises(TypeError, match="str for 'note'"):
        logger.log_metrics({"note": "hello"})
    with pytest.raises(TypeError, match="step='one'"):
        logger.log_metrics({"loss": 1.0}, step="one")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flush_logs_every_n_steps=0"):
        CSVLogger(tmp_path, flush_logs_every_n_steps=0)
    with pytest.raises(TypeError, match=r"version=1\.5"):
        CSVLogger(tmp_path, version=1.5)  # type: ignore[arg-type]
    assert not (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").exists()


def test_tensors_convert_once_per_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counting(name: str, original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any) -> Any:
            calls[name] += 1
            return original(self, *args)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=10)
    fabric = Fabric(accelerator="cpu", loggers=logger)
    for step in range(10):
        fabric.log_dict({"loss": torch.tensor(step / 10), "acc": torch.tensor(step / 20)}, step=step)
    assert calls == {"item": 0, "tolist": 1}  # 20 tensors, one conversion
    monkeypatch.undo()
    rows = read_csv(Path(logger.log_dir) / "metrics.csv")[1]
    assert [float(r["loss"]) for r in rows] == pytest.approx([s / 10 for s in range(10)])


def test_logger_copies_sent_to_new_processes_drop_buffered_rows(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path / "csv")
    tb_logger = TensorBoardLogger(tmp_path / "tb")
    for logger in (csv_logger, tb_logger):
        logger.log_metrics({"loss": torch.tensor(1.0)})
        _ = logger.experiment
    for logger in (csv_logger, tb_logger):
        copy = pickle.loads(pickle.dumps(logger))
        assert copy._rows == [] and copy.version == logger.version
        logger.finalize("success")
    assert read_csv(Path(csv_logger.log_dir) / "metrics.csv")[1][0]["loss"] == "1.0"


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    csv_logger, tb_logger = CSVLogger(tmp_path), TensorBoardLogger(tmp_path, name="tb")
    for logger in (csv_logger, tb_logger):
        logger._global_rank = 1
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.log_hyperparams({"lr": 0.1})
        logger.experiment.add_scalar("x", 1.0)  # a no-op stand-in
        logger.finalize("success")
    assert csv_logger.version == 0 and tb_logger.version == 0
    assert not any(tmp_path.iterdir())


# --- TensorBoard ------------------------------------------------------------------------------------
def test_tensorboard_scalars_hparams_and_layout(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", sub_dir="train", prefix="p", flush_logs_every_n_steps=2)
    assert logger.log_dir == str(tmp_path / "tb" / "version_0" / "train")
    for step in range(5):
        logger.log_metrics({"loss": torch.tensor(1.0 / (step + 1)), "nested": {"lr": 0.1}}, step=step * 10)
    logger.log_hyperparams({"lr": 0.1, "opt": {"name": "adam", "betas": (0.9, 0.99)}, "layers": 3})
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["p-loss"]] == [0, 10, 20, 30, 40]
    assert [v for _, v in scalars["p-loss"]] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert scalars["p-nested/lr"][0][1] == pytest.approx(0.1)
    assert scalars["p-hp_metric"] == [(0, -1.0)]
    params, metric_tags = read_hparams(logger.log_dir)
    assert params == {"lr": 0.1, "opt/name": "adam", "opt/betas": "(0.9, 0.99)", "layers": 3.0}
    assert metric_tags == ["p-hp_metric"]  # the tag the scalar has, so TensorBoard pairs them


def test_tensorboard_hparams_with_metrics_and_no_default(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, default_hp_metric=False, flush_secs=1)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"lr": 0.2}, metrics={"best_acc": 0.9}, step=7)
    logger.finalize("success")
    scalars = read_scalars(logger.log_dir)
    assert list(scalars) == ["best_acc"] and scalars["best_acc"][0][0] == 7


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_tensorboard_graph(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="example_input_array"):
        logger.log_graph(model)
    logger.log_graph(model, torch.randn(1, 3))
    logger.finalize("success")
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert acc.Tags()["graph"]


def test_tensorboard_missing_is_an_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r'pip install "handloom\[tensorboard\]"'):
        TensorBoardLogger(tmp_path)


# --- rows survive the end of the process ------------------------------------------------------------
EXIT_SCRIPT = """
import sys
from handloom import Fabric
from handloom.loggers import CSVLogger, TensorBoardLogger

root = sys.argv[1]

class Foreign:
    def log_metrics(self, metrics, step=None):
        pass

    def finalize(self, status):
        open(f"{root}/foreign-{status}", "w").close()

csv_logger = CSVLogger(root, name="csv", flush_logs_every_n_steps=100)
tb_logger = TensorBoardLogger(root, name="tb")
fabric = Fabric(accelerator="cpu", loggers=[csv_logger, tb_logger, Foreign()])
assert "tensorboard" not in sys.modules, "TensorBoard was imported before a logger wrote"
import torch
for step in range(5):
    fabric.log_dict({"loss": torch.tensor(float(step)), "step_sq": step * step}, step=step)
fabric.log("last", 1.5, step=5)
print(csv_logger.log_dir, tb_logger.log_dir)
if len(sys.argv) > 2:
    raise RuntimeError("the script fails")
"""


@pytest.mark.parametrize("fails", [False, True], ids=["exits", "raises"])
def test_rows_are_written_when_the_process_ends_without_finalize(tmp_path: Path, fails: bool) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    args = [sys.executable, str(script), str(tmp_path)] + (["fail"] if fails else [])
    done = subprocess.run(args, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == (1 if fails else 0), done.stderr
    csv_dir, tb_dir = done.stdout.split()
    header, rows = read_csv(Path(csv_dir) / "metrics.csv")
    assert header == ["step", "loss", "step_sq", "last"]
    assert [(r["step"], r["loss"], r["step_sq"]) for r in rows[:5]] == [
        (str(s), str(float(s)), str(s * s)) for s in range(5)
    ]
    assert rows[5]["last"] == "1.5"
    scalars = read_scalars(tb_dir)
    assert scalars["loss"] == [(s, float(s)) for s in range(5)] and scalars["last"] == [(5, 1.5)]
    assert (tmp_path / f"foreign-{'failed' if fails else 'success'}").exists()


# --- Fabric's logging API ---------------------------------------------------------------------------
def test_fabric_logger_properties_and_dispatch(tmp_path: Path) -> None:
    seen: list[tuple[dict[str, Any], int | None]] = []

    class Plain:
        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
            seen.append((metrics, step))

    csv_logger = CSVLogger(tmp_path)
    fabric = Fabric(accelerator="cpu", loggers=[csv_logger, Plain()])
    assert fabric.logger is csv_logger and len(fabric.loggers) == 2
    fabric.log("loss", torch.tensor(0.5), step=3)
    fabric.log_dict({"a": 1, "b": {"c": torch.tensor(2.0)}})
    assert seen == [({"loss": 0.5}, 3), ({"a": 1, "b": {"c": 2.0}}, None)]
    assert type(seen[0][0]["loss"]) is float  # other libraries' loggers get Python numbers
    with pytest.raises(ValueError, match=r"shape \(3,\) for 'acc'"):
        fabric.log_dict({"loss": 1.0, "acc": torch.ones(3)})
    assert len(seen) == 2  # rejected before any logger saw it
    fabric._finalize_loggers("success")
    assert [r["loss"] for r in read_csv(Path(csv_logger.log_dir) / "metrics.csv")[1]] == ["0.5", ""]

    single = Fabric(accelerator="cpu", loggers=csv_logger)
    assert single.loggers == [csv_logger]
    none = Fabric(accelerator="cpu")
    none.log("loss", 1.0)  # no logger: nothing to do
    for error in (RuntimeError, IndexError):  # IndexError is what Lightning raises
        with pytest.raises(error, match="no logger was given"):
            _ = none.logger
    with pytest.raises(TypeError, match=r"got \{'not': 'a logger'\} \(type dict\), which has no log_metrics"):
        Fabric(accelerator="cpu", loggers=[csv_logger, {"not": "a logger"}])


def test_custom_logger_subclass(tmp_path: Path) -> None:
    class Mine(Logger):
        def __init__(self) -> None:
            self.rows: list[Any] = []

        @property
        def name(self) -> str:
            return "mine"

        @property
        def version(self) -> int:
            return 0

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            self.rows.append((metrics, step))

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    mine = Mine()
    fabric = Fabric(accelerator="cpu", loggers=mine)
    fabric.log("x", torch.tensor(3))
    assert mine.rows == [({"x": 3}, None)] and mine.log_dir is None and mine.experiment is None
    mine.finalize("success")
    with pytest.raises(TypeError, match="abstract"):
        Logger()  # type: ignore[abstract]


# --- callbacks --------------------------------------------------------------------------------------
def test_callbacks_dispatch_filter_and_skip() -> None:
    calls: list[Any] = []

    class Full:
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            calls.append(("full", epoch, metrics))

        def on_after_setup(self, fabric: Fabric, module: Any) -> None:
            calls.append(("setup", type(module).__name__))

        def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
            calls.append(("step", type(optimizer).__name__))

    class Partial:
        def on_epoch_end(self, epoch: int) -> None:  # takes only some of the keyword arguments
            calls.append(("partial", epoch))

    class Anything:
        def on_epoch_end(self, *args: Any, **kwargs: Any) -> None:
            calls.append(("anything", args, kwargs))

    class Disabled:
        on_epoch_end = None

    class Nothing:
        pass

    fabric = Fabric(accelerator="cpu", callbacks=[Full(), Partial(), Anything(), Disabled(), Nothing()])
    fabric.call("on_epoch_end", epoch=1, metrics={"loss": 0.5})
    fabric.call("a_hook_nobody_has", 1, x=2)
    assert calls == [
        ("full", 1, {"loss": 0.5}),
        ("partial", 1),
        ("anything", (), {"epoch": 1, "metrics": {"loss": 0.5}}),
    ]
    calls.clear()
    model = nn.Linear(2, 2)
    module = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(module.parameters(), lr=0.1))
    fabric.backward(module(torch.randn(3, 2)).sum())
    optimizer.step()
    assert calls == [("step", "SGD")]  # as in Lightning, setup_module fires no on_after_setup

    class Broken:
        on_epoch_end = 3

    single = Fabric(accelerator="cpu", callbacks=Broken())
    with pytest.raises(TypeError, match=r"Broken.on_epoch_end = 3, which is not a method"):
        single.call("on_epoch_end", epoch=1)


def test_on_after_optimizer_step_gets_only_the_arguments_it_takes() -> None:
    from handloom import Fabric

    seen: list[Any] = []

    class OnlyOptimizer:
        def on_after_optimizer_step(self, optimizer: Any) -> None:
            seen.append(optimizer)

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[OnlyOptimizer()])
    model = torch.nn.Linear(2, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fabric.backward(model(torch.ones(1, 2)).sum())
    optimizer.step()
    assert seen == [optimizer.optimizer]
