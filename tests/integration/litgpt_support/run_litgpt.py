"""``python run_litgpt.py CMD ARGS... [--next CMD ARGS...]``: the ``litgpt`` CLI on handloom or on Lightning.

``LITGPT_BACKEND=handloom`` (the default) installs the import hook first; ``LITGPT_BACKEND=lightning``
runs litgpt untouched. Each command and its arguments are exactly a ``litgpt`` command line's.
Several one-process commands may share one interpreter, separated by ``--next``, so that the
imports (several seconds) are paid once. A command on several devices must run alone: the
launcher re-runs this process's command line once per device, and ``sys.argv[0]`` stays this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SEPARATOR = "--next"


def _commands(argv: list[str]) -> list[list[str]]:
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            commands.append([])
        else:
            commands[-1].append(arg)
    return [command for command in commands if command]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # synthetic_data, the hook and its shim
    backend = os.environ.get("LITGPT_BACKEND", "handloom")
    if backend == "handloom":
        from litgpt_on_handloom import install

        install()
    elif backend != "lightning":
        raise SystemExit(f"LITGPT_BACKEND={backend!r}: choose 'handloom' or 'lightning'")

    from litgpt.__main__ import main

    program = sys.argv[0]
    for command in _commands(sys.argv[1:]):
        print(f"=== litgpt {command[0]}", flush=True)
        sys.argv = [program, *command]
        main()
