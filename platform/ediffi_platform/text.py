"""The one text normalisation of prompts (generation) and captions (training), applied before encoding.

Removed: the byte-order mark U+FEFF, C0 and C1 control characters (NUL, ESC, ...) and DEL, the
bidi embedding / override / isolate controls U+202A-U+202E and U+2066-U+2069, and lone surrogates
(a JSON "\\ud800" escape; no character, not encodable as UTF-8). Tabs and line breaks (CR, LF, VT,
FF, NEL, U+2028, U+2029) become a space, runs of spaces one space, and surrounding whitespace is
stripped. Nothing else changes: no Unicode normalisation (NFC would rewrite CJK compatibility
ideographs and reorder combining marks; the tokenizers apply their own), so letters, emoji (with
their joiners and variation selectors), CJK and right-to-left text, its U+200E / U+200F marks
included, pass byte-exact.
"""

from __future__ import annotations

import re

_DROP = (
    *range(0x00, 0x20),
    0x7F,
    *range(0x80, 0xA0),
    0xFEFF,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    *range(0xD800, 0xE000),
)
_SPACE = "\t\n\v\f\r\x85\u2028\u2029"
_TABLE = {**dict.fromkeys(_DROP), **{ord(c): " " for c in _SPACE}}
_RUNS = re.compile(" {2,}")


def clean_text(text: str) -> str:
    """`text` as it is encoded (and stored): control and bidi-override characters removed, whitespace folded."""
    return _RUNS.sub(" ", text.translate(_TABLE)).strip()


def has_controls(text: str) -> bool:
    """Whether `text` holds a character that clean_text removes or turns into a space."""
    return any(ord(c) in _TABLE for c in text)


def was_cleaned(raw: str, clean: str) -> bool:
    """Whether normalisation changed more than the surrounding whitespace (what gets counted)."""
    return clean != raw.strip()
