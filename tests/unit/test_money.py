"""Parsing and formatting amounts: text <-> integer minor units, never a float."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.money import (
    CURRENCY_SCALE,
    MAX_MINOR,
    AmountError,
    format_amount,
    parse_amount,
    scale_of,
)


@pytest.mark.parametrize("text, minor, currency", [
    ("12.34 USD", 1234, "USD"),
    ("0.01 USD", 1, "USD"),
    ("12 USD", 1200, "USD"),
    ("12.3 USD", 1230, "USD"),
    ("0 USD", 0, "USD"),
    ("1234 JPY", 1234, "JPY"),
    ("0 JPY", 0, "JPY"),
    ("12.345 KWD", 12345, "KWD"),
    ("0.001 KWD", 1, "KWD"),
    ("7.5 KWD", 7500, "KWD"),
    ("-12.34 USD", -1234, "USD"),
    ("-5 JPY", -5, "JPY"),
    ("  1.00   usd ", 100, "USD"),
    ("00012.30 EUR", 1230, "EUR"),
])
def test_parse(text, minor, currency):
    assert parse_amount(text) == (minor, currency)


@pytest.mark.parametrize("minor, currency, text", [
    (1234, "USD", "12.34 USD"),
    (1, "USD", "0.01 USD"),
    (100, "USD", "1.00 USD"),
    (0, "USD", "0.00 USD"),
    (-1234, "USD", "-12.34 USD"),
    (-1, "USD", "-0.01 USD"),
    (1234, "JPY", "1234 JPY"),
    (-7, "JPY", "-7 JPY"),
    (12345, "KWD", "12.345 KWD"),
    (1, "KWD", "0.001 KWD"),
    (-1000, "KWD", "-1.000 KWD"),
    (MAX_MINOR, "USD", "92233720368547758.07 USD"),
])
def test_format(minor, currency, text):
    assert format_amount(minor, currency) == text


def test_the_largest_amount_parses_and_one_more_does_not():
    assert parse_amount("92233720368547758.07 USD") == (MAX_MINOR, "USD")
    with pytest.raises(AmountError, match="out of range"):
        parse_amount("92233720368547758.08 USD")
    with pytest.raises(AmountError, match="out of range"):
        parse_amount("-92233720368547758.08 USD")


@pytest.mark.parametrize("text", ["12.345 USD", "1.0 JPY", "0.5 JPY", "1.2345 KWD",
                                  "0.000 JPY"])
def test_more_decimals_than_the_currency_has_is_an_error(text):
    with pytest.raises(AmountError, match="decimal places"):
        parse_amount(text)


@pytest.mark.parametrize("text", ["12.34 XYZ", "1 ABC", "5 qqq"])
def test_unknown_currency_is_an_error(text):
    with pytest.raises(AmountError, match="unsupported currency"):
        parse_amount(text)


def test_unknown_currency_cannot_be_formatted():
    with pytest.raises(AmountError, match="unsupported currency"):
        format_amount(1, "XYZ")
    with pytest.raises(AmountError):
        scale_of("usd")  # codes are upper case; only parse_amount normalises


@pytest.mark.parametrize("text", [
    "", " ", "USD", "12.34", "12,34 USD", "1,000.00 USD", "$12.34", "12.34USD", "12.34 US",
    "12.34 USDD", ".5 USD", "12. USD", "+1 USD", "--1 USD", "1e3 USD", "1_000 USD",
    "nan USD", "inf USD", "12.34 USD extra", "0x10 USD", "1 2 USD", "- 1 USD",
])
def test_garbage_is_an_error(text):
    with pytest.raises(AmountError, match="not an amount"):
        parse_amount(text)


def test_amount_error_is_a_value_error():
    assert issubclass(AmountError, ValueError)


def test_scales():
    assert (scale_of("USD"), scale_of("JPY"), scale_of("KWD")) == (2, 0, 3)
    assert set(CURRENCY_SCALE.values()) == {0, 2, 3}


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(-MAX_MINOR, MAX_MINOR), st.sampled_from(sorted(CURRENCY_SCALE)))
def test_parse_of_format_is_the_identity(minor, currency):
    assert parse_amount(format_amount(minor, currency)) == (minor, currency)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 10**12), st.sampled_from(["USD", "JPY", "KWD"]))
def test_format_shows_exactly_the_scale_in_decimals(minor, currency):
    text = format_amount(minor, currency)
    number, code = text.split(" ")
    whole, _, decimals = number.partition(".")

    assert code == currency
    assert len(decimals) == scale_of(currency)
    assert int(whole + decimals) == minor
    assert format_amount(parse_amount(text)[0], currency) == text


@pytest.mark.parametrize("text", ["\uff11\uff12.34 USD",             # fullwidth 12
                                  "\u0661\u0662.\u0663\u0664 USD"])  # Arabic-Indic 12.34
def test_only_ascii_digits_are_amounts(text):
    with pytest.raises(AmountError):
        parse_amount(text)
