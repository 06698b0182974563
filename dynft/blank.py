"""Whether a string has nothing a reader (or a tokenizer) could see: the rule for an empty text,
label, id or teacher label.

A string is blank when it is empty or every character is a space, a control or format character
(the zero-width space and joiners among them), a filler that renders as nothing (U+3164, U+2800),
or a combining mark with no base character to sit on (``"\u0301\u0301"``: BERT's tokenizer
strips such marks, and no language writes them alone). A text of only these would train its
label on an empty input, and a label or an id of only these is one nobody can read or type back.

>>> [blank(s) for s in ("", " \t", "\u200b", "\x01\x02", "\u0301\u0301", "e\u0301", "ham", "\u00a0x", "\u3164\u2800")]
[True, True, True, True, True, False, False, False, True]
"""

from __future__ import annotations

import unicodedata

# Control, format, separators (spaces, line and paragraph), non-spacing and enclosing marks.
_BLANK = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})

# How a non-empty blank string is described in an error, after what it is ("text", "texts[3]").
NOTHING_VISIBLE = "{} has no visible character (only spaces, control, format or combining ones)"


# Letters and symbols that render as nothing: the Hangul fillers and the braille blank (letters
# by their category, so a probe's label of only U+3164 was accepted), and the code points Unicode
# reserves as default-ignorable (a renderer shows nothing for them, assigned or not).
_EMPTY = frozenset([0x115F, 0x1160, 0x2800, 0x3164, 0xFFA0, 0x2065, *range(0xFFF0, 0xFFF9), *range(0xE0000, 0xE1000)])


def blank(value: str) -> bool:
    """Empty or only invisible characters; stops at the first visible one (mostly the first)."""
    return value.isspace() or all(unicodedata.category(c) in _BLANK or ord(c) in _EMPTY for c in value)
