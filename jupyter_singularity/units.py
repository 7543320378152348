"""Byte sizes as people write them in config files, and as they want to read them back."""

import re
from decimal import Decimal

_KIB = 1024

# Lower-cased unit -> bytes. Bare K/M/G/T are binary because that is what GPU memory
# sizes mean in practice ("16G" on an accelerator is 16 GiB, never 16 * 10**9).
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": _KIB,
    "m": _KIB**2,
    "g": _KIB**3,
    "t": _KIB**4,
    "kib": _KIB,
    "mib": _KIB**2,
    "gib": _KIB**3,
    "tib": _KIB**4,
}

_SIZE_RE = re.compile(r"^\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

# Largest unit last; format_size never goes past TiB so its output stays parseable.
_BINARY_STEPS: tuple[tuple[str, int], ...] = (
    ("KiB", _KIB),
    ("MiB", _KIB**2),
    ("GiB", _KIB**3),
    ("TiB", _KIB**4),
)


def _invalid(value: object, why: str = "") -> ValueError:
    """One message shape for every rejection, so config errors read the same everywhere."""
    detail = f" ({why})" if why else ""
    return ValueError(
        f"invalid size {value!r}{detail}: use a number with a unit such as '16GiB' or '512MiB'"
    )


def parse_size(value: str | int) -> int:
    """Turn a config size ("16GiB", "2GB", 1024) into bytes, rejecting anything ambiguous.

    Fractions are allowed ("1.5GiB"); a result below one byte of precision is truncated,
    since no memory limit is meaningful at that resolution.
    """
    if isinstance(value, bool):
        raise TypeError(f"size must be an int or a string, not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise _invalid(value, "sizes cannot be negative")
        return value
    if not isinstance(value, str):
        raise TypeError(f"size must be an int or a string, not {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise _invalid(value)
    sign, number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise _invalid(value, f"unknown unit {unit!r}")
    size = int(Decimal(number) * multiplier)
    if sign == "-" and size != 0:
        raise _invalid(value, "sizes cannot be negative")
    return size


def format_size(n: int) -> str:
    """Render bytes for humans in binary units, in a form parse_size reads back."""
    if n < 0:
        raise ValueError(f"cannot format a negative size: {n}")
    if n < _KIB:
        return f"{n} B"
    for name, factor in _BINARY_STEPS[:-1]:
        value = n / factor
        # Step up when rounding would print "1024.0 KiB" instead of "1.0 MiB".
        if round(value, 1) < _KIB:
            return f"{value:.1f} {name}"
    name, factor = _BINARY_STEPS[-1]
    return f"{n / factor:.1f} {name}"
