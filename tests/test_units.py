"""Sizes in config files: what is accepted, what is refused and how it reads back."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyter_singularity.units import format_size, parse_size

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * GIB),
        ("16 GiB", 16 * GIB),
        ("512MiB", 512 * MIB),
        ("1.5GiB", 3 * GIB // 2),
        ("2GB", 2 * 10**9),
        ("1024", 1024),
        ("4KiB", 4 * KIB),
        ("1TiB", TIB),
        ("16gib", 16 * GIB),
        ("16G", 16 * GIB),
        ("8m", 8 * MIB),
        ("3K", 3 * KIB),
        ("1T", TIB),
        ("7b", 7),
        ("5kb", 5000),
        ("5MB", 5 * 10**6),
        ("1tb", 10**12),
        ("  2 GiB  ", 2 * GIB),
        (".5KiB", 512),
        # Below one byte of precision is truncated.
        ("0.1KiB", 102),
        ("0", 0),
        ("-0B", 0),
    ],
)
def test_parse_size_examples(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["sixteen gigs", "", "GiB", "16 GiBs", "16XB", "1.2.3GiB", "16 G iB", "nan", "1e9"],
)
def test_parse_size_rejects_with_example(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "'16GiB'" in message


def test_parse_size_message_reads_well() -> None:
    with pytest.raises(ValueError) as caught:
        parse_size("sixteen gigs")
    assert str(caught.value) == (
        "invalid size 'sixteen gigs': use a number with a unit such as '16GiB' or '512MiB'"
    )


def test_parse_size_names_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown unit 'XB'"):
        parse_size("16XB")


@pytest.mark.parametrize("value", ["-1GiB", "-5", -1, -(2**40)])
def test_parse_size_rejects_negative(value: str | int) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, 1.5, None, b"16GiB"])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (16 * GIB, "16.0 GiB"),
        (17179869184, "16.0 GiB"),
        (512 * MIB, "512.0 MiB"),
        (TIB, "1.0 TiB"),
        (2048 * TIB, "2048.0 TiB"),
        # Would round to "1024.0 KiB"; the next unit up reads better.
        (MIB - 1, "1.0 MiB"),
    ],
)
def test_format_size_examples(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


@given(st.integers(min_value=0, max_value=2**80))
def test_parse_size_int_is_identity(n: int) -> None:
    assert parse_size(n) == n


@given(st.integers(min_value=0, max_value=2**80))
def test_parse_size_decimal_string_is_bytes(n: int) -> None:
    assert parse_size(str(n)) == n


@given(
    st.sampled_from([KIB, MIB, GIB]),
    st.integers(min_value=1, max_value=1023),
    st.booleans(),
)
def test_exact_binary_sizes_round_trip(unit: int, whole: int, half: bool) -> None:
    # k or k.5 units print exactly with one decimal, so nothing is lost on the way back.
    n = whole * unit + (unit // 2 if half else 0)
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=1, max_value=10**6), st.booleans())
def test_exact_tib_sizes_round_trip(whole: int, half: bool) -> None:
    n = whole * TIB + (TIB // 2 if half else 0)
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=2**60))
def test_format_size_is_close_to_the_truth(n: int) -> None:
    # One decimal in a unit of at least 1.0 is off by at most 0.05 / 1.0 = 5%.
    assert abs(parse_size(format_size(n)) - n) <= n * 0.05
