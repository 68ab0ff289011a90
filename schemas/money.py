"""Money as integer minor units, and the one place amounts are parsed and formatted.

A currency's scale (how many minor units make a major unit) is fixed here: USD has
2 (1234 minor = "12.34 USD"), JPY 0, KWD 3. Nothing in the ledger ever holds money
in a float; parsing goes from text straight to an integer.
"""

from __future__ import annotations

import re

CURRENCY_SCALE: dict[str, int] = {
    "USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "SEK": 2, "NOK": 2,
    "DKK": 2, "PLN": 2, "CZK": 2, "SGD": 2, "HKD": 2, "CNY": 2, "INR": 2, "BRL": 2,
    "MXN": 2, "ZAR": 2, "JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0,
    "KWD": 3, "BHD": 3, "JOD": 3, "OMR": 3, "TND": 3,
}

# Avro long: every amount and balance must fit in a signed 64-bit integer.
MAX_MINOR = 2**63 - 1
# One command moves at most 2**53 minor units: exact as a JSON number in any client
# (JavaScript's safe integers), and far above any real payment.
MAX_AMOUNT_MINOR = 2**53
# Deposits, credits and holds stop at 2**62, leaving headroom below 2**63 for refunds
# of transfers still in flight, which must always apply.
MAX_BALANCE_MINOR = 2**62

_AMOUNT = re.compile(r"^\s*(-?)([0-9]+)(?:\.([0-9]+))?\s+([A-Za-z]{3})\s*$")


class AmountError(ValueError):
    """Text that is not an amount this ledger can represent exactly."""


def scale_of(currency: str) -> int:
    try:
        return CURRENCY_SCALE[currency]
    except KeyError:
        raise AmountError(f"unsupported currency {currency!r}") from None


def parse_amount(text: str) -> tuple[int, str]:
    """Parse "12.34 USD" into (1234, "USD"). More decimals than the scale is an error."""
    m = _AMOUNT.match(text)
    if not m:
        raise AmountError(f"not an amount: {text!r} (expected e.g. '12.34 USD')")
    sign, whole, frac, currency = m.group(1), m.group(2), m.group(3) or "", m.group(4).upper()
    scale = scale_of(currency)
    if len(frac) > scale:
        raise AmountError(f"{currency} has {scale} decimal places; {text!r} has {len(frac)}")
    minor = int(whole) * 10**scale + int(frac.ljust(scale, "0") or "0")
    if minor > MAX_MINOR:
        raise AmountError(f"amount out of range: {text!r}")
    return (-minor if sign else minor), currency


def format_amount(minor: int, currency: str) -> str:
    """Format (1234, "USD") as "12.34 USD"; negative amounts keep their sign."""
    scale = scale_of(currency)
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**scale)
    return f"{sign}{whole}.{frac:0{scale}d} {currency}" if scale else f"{sign}{whole} {currency}"
