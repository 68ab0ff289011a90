"""The page's money code in the browser agrees with schemas/money.py, beyond 2**53 too."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.money import CURRENCY_SCALE, AmountError, format_amount, parse_amount

pytestmark = pytest.mark.browser

APP_JS = Path(__file__).parents[2] / "streams" / "api" / "static" / "app.js"


@pytest.fixture(scope="module")
def money(browser):
    ctx = browser.new_context()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_content("<!doctype html><title>money</title>")
    page.add_script_tag(path=str(APP_JS))
    yield page
    ctx.close()
    assert not errors, errors


def test_scales_are_the_ledgers(money):
    assert money.evaluate("window.ledgerMoney.SCALES") == CURRENCY_SCALE


@pytest.mark.parametrize("minor,currency", [
    (0, "USD"), (5, "USD"), (-5, "USD"), (1234, "USD"), (100, "EUR"), (1234, "JPY"),
    (-1, "KWD"), (1001, "KWD"), (2**53 + 1, "USD"), (2**63 - 1, "USD"), (-(2**63), "BHD"),
    (9_007_199_254_740_993, "JPY"),
])
def test_format_matches_python(money, minor, currency):
    got = money.evaluate("([m, c]) => window.ledgerMoney.formatAmount(BigInt(m), c)",
                         [str(minor), currency])
    assert got == format_amount(minor, currency)


@pytest.mark.parametrize("text,currency", [
    ("12.34", "USD"), ("12.3", "USD"), ("12", "USD"), ("0.01", "USD"),
    ("7", "JPY"), ("1.234", "KWD"), ("  3.10 usd ", "USD"), ("90071992547409.92", "USD"),
    ("0.1", "EUR"), ("1.005", "USD")
])
def test_parse_matches_python(money, text, currency):
    js = money.evaluate("""([t, c]) => {
        try { return window.ledgerMoney.parseAmount(t, c).toString(); }
        catch (e) { return "error: " + e.message; }
    }""", [text, currency])
    try:
        minor, _ = parse_amount(text.strip().removesuffix("usd").strip() + f" {currency}")
    except AmountError:
        assert js.startswith("error: "), js
        assert "decimal places" in js  # said in words
    else:
        assert js == str(minor)


def test_parse_takes_a_leading_point(money):
    assert money.evaluate("() => String(window.ledgerMoney.parseAmount('.5', 'USD'))") == "50"


@pytest.mark.parametrize("text", ["", "abc", "1,5", "-3", "1e3", "0", "0.00", "1.2.3",
                                  "90071992547409.93", "NaN", "12.34 EUR"])
def test_parse_refuses_in_words(money, text):
    js = money.evaluate("""(t) => {
        try { return window.ledgerMoney.parseAmount(t, "USD").toString(); }
        catch (e) { return "error: " + e.message; }
    }""", text)
    assert js.startswith("error: ") and len(js) > 20, js


def test_json_keeps_big_integers(money):
    doc = ('{"balance_minor": 9223372036854775807, "available_minor": -9007199254740993, '
           '"version": 3, "detail": "\\"amount_minor\\": 12345678901234567890", '
           '"events": [{"amount_minor": 9007199254740993}]}')
    got = money.evaluate("""(t) => {
        const d = window.ledgerMoney.parseJson(t);
        return [typeof d.balance_minor, String(d.balance_minor), String(d.available_minor),
                d.version, d.detail, String(d.events[0].amount_minor)];
    }""", doc)
    assert got == ["bigint", "9223372036854775807", "-9007199254740993", 3,
                   '"amount_minor": 12345678901234567890', "9007199254740993"]
    out = money.evaluate("""() => window.ledgerMoney.toJson(
        {type: "Deposit", amount_minor: 9007199254740993n, account_id: "a\\u0000int:1"})""")
    assert out == ('{"type":"Deposit","amount_minor":9007199254740993,'
                   '"account_id":"a\\u0000int:1"}')
