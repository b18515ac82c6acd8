"""The one text normalisation of prompts and captions: what it removes, and what passes byte-exact."""

import pytest

from ediffi_platform.text import clean_text, has_controls


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("\ufeffa red circle", "a red circle"),  # a byte-order mark left by an editor
        ("a red\x00 circle\x00", "a red circle"),  # NUL and the other C0 controls
        ("a\x01\x1b[31m red\x7f circle", "a[31m red circle"),  # ANSI escape: ESC and DEL dropped
        ("a \x85red\x9b circle", "a red circle"),  # C1: NEL is a line break, the rest dropped
        ("a red \u202ecircle\u202c \u2066x\u2069", "a red circle x"),  # bidi embeddings, overrides, isolates
        ("a red\tcircle\r\non\u2028white", "a red circle on white"),  # tabs and line breaks: one space
        ("  a   red  circle ", "a red circle"),
        ("a \ud800circle", "a circle"),  # a lone surrogate (a JSON "\ud800" escape) is no character
        ("\x00\ufeff\u202e \t", ""),
    ],
)
def test_removes_controls_and_folds_whitespace(raw, clean):
    assert clean_text(raw) == clean and clean_text(clean) == clean  # idempotent
    assert has_controls(raw) == (raw != "  a   red  circle ")  # spaces alone are no control


@pytest.mark.parametrize(
    "text",
    [
        "a 👩\u200d👩\u200d👧 family, ❤\ufe0f and 🏳\ufe0f\u200d🌈",  # emoji with their joiners and selectors
        "赤い丸、白い背景\u3000の上",  # CJK with an ideographic space inside
        "\uf900 compatibility ideograph",  # NFC would rewrite it to U+8C48
        "دائرة حمراء \u200fعلى خلفية بيضاء",  # Arabic, with a right-to-left mark
        "עיגול אדום",  # Hebrew
        "cafe\u0301 (decomposed)",  # no NFC either: combining marks stay as written
        "non\u00a0breaking and zero\u200bwidth",
    ],
)
def test_letters_emoji_cjk_and_rtl_pass_byte_exact(text):
    assert clean_text(text).encode() == text.encode() and not has_controls(text)
