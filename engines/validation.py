"""One way to validate settings: `Checks`, typed checks that name the setting when they fail.

Used by the training config (training/config.py), the export options (aptp_export/export_options.py), the
serve config and Ray options (engines/serving), the eval config (benchmarks/evaluate.py), the request model
(engines/request.py) and the manifest reader (engines/manifest.py). Each user picks its error type and
message prefix once:

    c = Checks(EngineError, "serve setting ")
    workers = c.integer(value, "workers", lo=1)        # EngineError "serve setting workers: 0 is below 1"
    c.require(lo < hi, "lo", "must be below hi", lo)    # "... lo: must be below hi, got 3"

Integers are real ints (numpy ints too), never bools; numbers are finite ints or floats, never bools.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError

_NOTHING = object()


def is_int(v) -> bool:
    """A real integer (numpy integers too), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite real number (int or float, numpy too), not a bool. Never converts an int to float (a
    400-digit integer is a number, out of any range, not an OverflowError)."""
    return is_int(v) or (isinstance(v, (float, np.floating)) and math.isfinite(v))


class Checks:
    """Typed checks raising `error(prefix + where + sep + message)`."""

    def __init__(self, error: type[Exception] = UserError, prefix: str = "", sep: str = ": "):
        self.error, self.prefix, self.sep = error, prefix, sep

    def fail(self, where: str, msg: str):
        raise self.error(f"{self.prefix}{where}{self.sep}{msg}")

    def require(self, cond: bool, where: str, msg: str, value=_NOTHING) -> None:
        """Fail with `msg` (and ", got VALUE" when given) unless `cond`."""
        if not cond:
            self.fail(where, msg if value is _NOTHING else f"{msg}, got {value!r}")

    def integer(self, value, where: str, lo: int | None = None, hi: int | None = None) -> int:
        if not is_int(value):
            self.fail(where, f"expected an integer, got {value!r}")
        if lo is not None and value < lo:
            self.fail(where, f"{value!r} is below {lo}")
        if hi is not None and value > hi:
            self.fail(where, f"{value!r} is above {hi}")
        return int(value)

    def number(self, value, where: str, lo: float | None = None, hi: float | None = None,
               above: bool = False, optional: bool = False) -> float | None:
        """A finite number in [lo, hi] ((lo, hi] with `above`); None passes when `optional`."""
        if value is None and optional:
            return None
        if not is_number(value):
            self.fail(where, f"expected a number, got {value!r}")
        if (lo is not None and (value < lo or (above and value == lo))) or (hi is not None and value > hi):
            self.fail(where, f"{value!r} is outside {'(' if above else '['}{lo}, {hi}]")
        return float(value)

    def string(self, value, where: str, choices=None, empty: bool = False) -> str:
        if not isinstance(value, str) or (not value and not empty):
            self.fail(where, f"expected a {'' if empty else 'non-empty '}string, got {value!r}")
        if choices and value not in choices:
            self.fail(where, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def boolean(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {value!r}")
        return value

    def obj(self, value, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
        """A mapping with every `required` key and no key outside `required` + `optional`."""
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {type(value).__name__}")
        for key in required:
            if key not in value:
                self.fail(where, f"missing key {key!r}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            self.fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}")
        return value

    def coerce(self, value, where: str, kind: type):
        """`value` as `kind` (int, float or str), converting strings (command line, environment); never a bool."""
        if kind is str:
            return self.string(value, where, empty=True)
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                self.fail(where, f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if kind is int:
            return self.integer(value, where)
        if kind is float:
            return self.number(value, where)
        raise TypeError(f"coerce: unsupported kind {kind!r}")
