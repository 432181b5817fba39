"""Read and validate launcher variables, with errors that name the variable and the fix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

MAX_PORT = 65535


def variables(env: Mapping[str, str] | None) -> Mapping[str, str]:
    """``env``, or this process's environment variables when it is ``None``.

    Lightning's ``detect()`` takes no argument and reads ``os.environ``; handloom passes a mapping.
    """
    return os.environ if env is None else env


@dataclass(frozen=True, slots=True)
class EnvReader:
    """Reads one launcher's variables from a mapping and explains what is wrong with them.

    Attributes:
        env: The variables to read.
        launcher: The program that sets them, as users know it (``"torchrun"``, ``"srun"``, ...).
        fix: The sentence every error ends with: what the user should do.
    """

    env: Mapping[str, str]
    launcher: str
    fix: str

    def text(self, name: str) -> str | None:
        """Return the stripped value of ``name``, or ``None`` when it is unset or empty."""
        value = self.env.get(name, "").strip()
        return value or None

    def require_text(self, name: str) -> str:
        """Return the value of ``name``; raise ``ValueError`` when it is unset or empty."""
        value = self.text(name)
        if value is None:
            raise ValueError(
                f"{name} is not set. {self.launcher} sets it for every process it starts, and "
                f"handloom cannot place this process without it. {self.fix}"
            )
        return value

    def integer(self, name: str, *, minimum: int = 0) -> int:
        """Return ``name`` as an integer of at least ``minimum``; raise ``ValueError`` otherwise."""
        return self.to_int(name, self.require_text(name), minimum=minimum)

    def optional_integer(self, name: str, *, minimum: int = 0) -> int | None:
        """Like :meth:`integer`, but ``None`` when ``name`` is unset or empty."""
        value = self.text(name)
        return None if value is None else self.to_int(name, value, minimum=minimum)

    def to_int(self, name: str, value: str, *, minimum: int = 0) -> int:
        """Parse ``value`` (read from ``name``) as an integer of at least ``minimum``."""
        try:
            number = int(value)
        except ValueError:
            raise ValueError(
                f"{name}={value!r} is not a whole number. handloom reads it as a count or a rank, "
                f"so it cannot place this process. {self.fix}"
            ) from None
        if number < minimum:
            raise ValueError(f"{name}={number} is out of range. It must be at least {minimum}. {self.fix}")
        return number

    def check_below(self, rank_name: str, rank: int, size_name: str, size: int) -> None:
        """Raise ``ValueError`` unless ``0 <= rank < size``."""
        if rank >= size:
            raise ValueError(
                f"{rank_name}={rank} is not below {size_name}={size}. Ranks count from 0, so the "
                f"valid values are 0 to {size - 1}. {self.fix}"
            )

    def port(self, name: str = "MASTER_PORT") -> int | None:
        """Return ``name`` as a TCP port, or ``None`` when it is unset or empty."""
        value = self.text(name)
        if value is None:
            return None
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_PORT:
            raise ValueError(
                f"{name}={value!r} is not a port number. Ports are whole numbers from 1 to "
                f"{MAX_PORT}. Set {name} to a free port, or unset it."
            )
        return int(value)

    def require_port(self, name: str = "MASTER_PORT") -> int:
        """Like :meth:`port`, but raise ``ValueError`` when ``name`` is unset or empty."""
        self.require_text(name)
        port = self.port(name)
        assert port is not None  # require_text rejected the unset case
        return port
