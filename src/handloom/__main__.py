"""``python -m handloom``: the same command line as the ``handloom`` console script."""

from __future__ import annotations

from handloom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
