"""Every public module and name of the installed ``lightning.fabric`` exists at the same path under
``handloom`` (or refuses with a reason), and docs/lightning-api-coverage.md lists them as they are."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="Lightning is not installed")
def test_every_public_lightning_fabric_name_exists_in_handloom_and_the_table_is_current() -> None:
    # In a subprocess: importing Lightning changes process-wide settings (logging, environment).
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lightning_surface.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    offered, total = map(int, re.findall(r"(\d+) of (\d+) offered", result.stdout)[0])
    assert offered == total and total > 200, result.stdout[-500:]


def test_refused_names_raise_errors_that_say_why() -> None:
    from handloom.accelerators import TPUAccelerator
    from handloom.plugins import XLAPrecision
    from handloom.strategies import DeepSpeedStrategy, SingleTPUStrategy

    with pytest.raises(RuntimeError, match=r"does not support TPUs.*Fabric\(accelerator='cuda'\)"):
        TPUAccelerator()
    with pytest.raises(RuntimeError, match=r"does not support TPUs.*SingleDeviceStrategy\(device="):
        SingleTPUStrategy(device="cpu")
    with pytest.raises(NotImplementedError, match=r"TPUs"):
        XLAPrecision()
    with pytest.raises(ValueError, match=r"FSDPStrategy\(sharding_strategy='FULL_SHARD'"):
        DeepSpeedStrategy(stage=3)
