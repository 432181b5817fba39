"""``lightning.fabric.utilities.enums``: :class:`LightningEnum`, a string enum compared case-insensitively."""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Literal

from typing_extensions import Self

__all__ = ["LightningEnum"]

_Source = Literal["key", "value", "any"]


class LightningEnum(str, Enum):
    """An enum of strings that equals its value in any letter case (``Mode.TRAIN == "train"``).

    Example::

        class Mode(LightningEnum):
            TRAIN = "train"
            EVAL = "eval"

        Mode.from_str("Train") is Mode.TRAIN
    """

    @classmethod
    def from_str(cls, value: str, source: _Source = "key") -> Self:
        """The member whose name (``source="key"``), value (``"value"``) or either (``"any"``, names
        first) is ``value``, in any letter case.

        Raises:
            ValueError: No member matches.
        """
        if source in ("key", "any"):
            for name, member in cls.__members__.items():
                if name.lower() == value.lower():
                    return member
        if source in ("value", "any"):
            for member in cls.__members__.values():
                if member == value:  # the case-insensitive comparison below
                    return member
        raise ValueError(
            f"{cls.__name__}.from_str({value!r}, source={source!r}) matches no member. Use one of:"
            f" {', '.join(cls._choices(source))}."
        )

    @classmethod
    def try_from_str(cls, value: str, source: _Source = "key") -> Self | None:
        """:meth:`from_str`, or ``None`` with a warning when nothing matches."""
        try:
            return cls.from_str(value, source)
        except ValueError as err:
            warnings.warn(str(err), UserWarning, stacklevel=2)
            return None

    @classmethod
    def _choices(cls, source: str) -> list[str]:
        names = list(cls.__members__)
        values = [str(member.value) for member in cls.__members__.values()]
        return {"key": names, "value": values}.get(source, names + values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Enum):
            other = other.value
        return str(self.value).lower() == str(other).lower()

    def __hash__(self) -> int:
        return hash(str(self.value).lower())
