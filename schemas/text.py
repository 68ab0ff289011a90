"""Which characters an id (and a correlation id) may not hold: one rule everywhere.

Ids are shown to people, logged and compared byte for byte, so none may hold a
character that is invisible or changes how text around it reads: the C0 and C1
controls and DEL, the Unicode format characters (general category Cf: bidirectional
overrides, zero-width joiners, the byte-order mark, tags, ...), the line and
paragraph separators and lone surrogates. The list is written out, not asked of
``unicodedata``, so that workers on different Python versions (whose Unicode
databases differ) decide the same command the same way.
"""

from __future__ import annotations

from typing import Final

# (first, last) code points, inclusive: Cc, Cf (Unicode 15.1), Zl, Zp, Cs
REFUSED_RANGES: Final = (
    (0x00, 0x1F), (0x7F, 0x9F), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C),
    (0x6DD, 0x6DD), (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x180E, 0x180E),
    (0x200B, 0x200F), (0x2028, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F),
    (0xD800, 0xDFFF), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)
REFUSED: Final = frozenset(c for first, last in REFUSED_RANGES for c in range(first, last + 1))
MAX_ID_LENGTH: Final = 200


def plain(value: str) -> bool:
    """No refused character (see the module's docstring)."""
    return not any(ord(ch) in REFUSED for ch in value)
