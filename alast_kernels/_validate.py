"""Checks of the package's number arguments: counts, fractions, rates, index lists.

Each check returns the value as a Python ``int`` / ``float`` and otherwise raises ``ValueError`` naming the
argument and what was expected (``"keep_ratio: expected a number in (0, 1], got 1.5"``). Python and numpy
numbers pass alike (numpy registers its scalar types with :mod:`numbers`); a bool never does: ``True`` is
an ``int`` to Python, never a count or a rate here.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Optional, Tuple

__all__ = ["is_int", "is_real", "check_int", "check_real", "check_fraction", "check_reals", "check_distinct_ints"]


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or numpy integer or floating-point number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, expected: str, value, optional: bool, note: str):
    raise ValueError(f"{name}: expected {expected}{' or None' if optional else ''}{note}, got {value!r}")


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None, *,
              optional: bool = False, note: str = "") -> Optional[int]:
    """``value`` as an ``int`` in ``[low, high]`` (an open end where ``None``).

    optional: ``None`` is accepted and returned. note: said after what was expected, e.g.
    ``" (the model has 12 blocks)"``.
    """
    if optional and value is None:
        return None
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if high is not None:
            expected = f"an int in [{low}, {high}]"
        elif low is None:
            expected = "an int"
        else:
            expected = "a positive int" if low == 1 else f"an int >= {low}"
        _fail(name, expected, value, optional, note)
    return int(value)


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False, optional: bool = False) -> Optional[float]:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high``, each end closed unless
    ``low_open`` / ``high_open`` (``check_real("alpha", a, 0, 1, low_open=True)``: ``(0, 1]``).

    optional: ``None`` is accepted and returned.
    """
    if optional and value is None:
        return None
    if not (is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)):
        if math.isinf(low) and math.isinf(high):
            expected = "a finite number"
        elif math.isinf(high):
            expected = f"a finite number {'>' if low_open else '>='} {low}"
        else:
            expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(name, expected, value, optional, "")
    return float(value)


def check_fraction(name: str, value) -> float:
    """``value`` as a ``float`` in ``(0, 1]``: a keep ratio, a budget, a rate."""
    return check_real(name, value, 0, 1, low_open=True)


def check_reals(name: str, values, count: int, low: float = -math.inf, high: float = math.inf) -> List[float]:
    """``values``, a list or tuple of ``count`` finite numbers in ``[low, high]``, as floats."""
    if not isinstance(values, (list, tuple)) or len(values) != count \
            or not all(is_real(v) and math.isfinite(v) and low <= v <= high for v in values):
        raise ValueError(f"{name}: expected a list of {count} finite numbers in [{low}, {high}], got {values!r}")
    return [float(v) for v in values]


def check_distinct_ints(name: str, values: Iterable, low: int, high: Optional[int] = None, *, what: str = "ints",
                        optional: bool = False) -> Tuple[int, ...]:
    """``values``, distinct ints in ``[low, high)`` (no upper end where ``high`` is ``None``), sorted.

    what: what they are, for the message (``"block indices"``). optional: say in the message that ``None``
    is accepted too (the caller puts its default in its place).
    """
    try:
        found = list(values)
    except TypeError:
        found = None
    if found is None or any(not is_int(v) or v < low or (high is not None and v >= high) for v in found) \
            or len(set(found)) != len(found):
        expected = f"distinct {what} in [{low}, {high})" if high is not None else \
            f"distinct positive {what}" if low == 1 else f"distinct {what} >= {low}"
        _fail(name, expected, values, optional, "")
    return tuple(sorted(int(v) for v in found))
