"""Slurm's compressed host lists: ``"node[01-03,07],gpu1"`` and ``"rack[1-2]-node[1-2]"``."""

from __future__ import annotations

import itertools
import re

_BRACKET_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list into host names, in Slurm's order.

    Items are separated by commas outside brackets. Inside brackets, ``a-b`` is an inclusive
    range and ``,`` separates alternatives; a range keeps the zero padding of its lower bound
    (``[08-10]`` gives ``08, 09, 10``). Several bracket groups in one item multiply out, the
    last one varying fastest (``rack[1-2]-node[1-2]`` gives ``rack1-node1, rack1-node2, ...``).

    Args:
        hostlist: The value of ``SLURM_NODELIST`` or ``SLURM_JOB_NODELIST``.

    Returns:
        The host names; empty for an empty string.

    Raises:
        ValueError: The brackets are unbalanced or nested, or a range is empty, reversed or not
            made of digits.
    """
    try:
        return [host for item in _split_items(hostlist) for host in _expand_item(item)]
    except ValueError as err:
        reason = str(err)
        raise ValueError(
            f"{hostlist!r} is not a valid Slurm host list. {reason[:1].upper()}{reason[1:]}. Write it "
            "as Slurm does, for example 'node[01-04,07],gpu3'."
        ) from None


def _split_items(hostlist: str) -> list[str]:
    items: list[str] = []
    depth = 0
    start = 0
    for index, char in enumerate(hostlist):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError("brackets are nested")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("a ']' has no matching '['")
        elif char == "," and depth == 0:
            items.append(hostlist[start:index])
            start = index + 1
    if depth:
        raise ValueError("a '[' is never closed")
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> list[str]:
    parts: list[list[str]] = []
    position = 0
    for group in _BRACKET_GROUP.finditer(item):
        parts.append([item[position : group.start()]])
        parts.append(_expand_ranges(group.group(1)))
        position = group.end()
    parts.append([item[position:]])
    return ["".join(pieces) for pieces in itertools.product(*parts)]


def _expand_ranges(ranges: str) -> list[str]:
    numbers: list[str] = []
    for piece in ranges.split(","):
        low, dash, high = piece.strip().partition("-")
        if not _is_number(low) or (dash and not _is_number(high)):
            raise ValueError(f"'[{ranges}]' holds {piece.strip()!r}, which is not a number or range")
        if not dash:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"the range {piece.strip()!r} runs backwards")
        numbers.extend(f"{number:0{len(low)}d}" for number in range(int(low), int(high) + 1))
    return numbers


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()
