"""``python -m handloom.utilities.consolidate_checkpoint CKPT_DIR [--output_file OUT]``.

Lightning's module-level command; it runs ``handloom consolidate`` (see
:func:`handloom.checkpoint.consolidate.consolidate`). Lightning defines no public names here.
"""

from __future__ import annotations

import sys


def _main(argv: list[str] | None = None) -> int:
    from handloom.cli import main

    return main(["consolidate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(_main())
