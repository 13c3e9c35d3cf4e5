"""Text from outside (a model file's metadata, a manifest, a client's request line) made safe
to print on a terminal.

A terminal obeys control characters: ESC sequences move the cursor, rewrite lines, set the
window title or a hyperlink, and some terminals answer queries by typing into the shell. A
model's `general.name` printed raw could make `modelrun inspect`, the very command a
careful user runs before trusting a file, show something else than the file holds. So every
control character (C0, DEL, C1), line and paragraph separator, and bidirectional override
(which reorders what is shown) is printed as a visible escape, \\x1b or \\u202e, as Python's
repr writes them; everything else, accents and emoji included, is left as it is.
"""

from __future__ import annotations

import unicodedata

# Format characters (category Cf) that change what is shown; the others (zero-width joiners
# in emoji, soft hyphens) are harmless.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _needs_escape(char: str) -> bool:
    return char in BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Zl", "Zp")


def printable(value: object, keep_layout: bool = False) -> str:
    """str(value) with every character a terminal would act on shown as an escape
    (keep_layout: "\\n" and "\\t" stay line breaks and tabs, for text printed as several
    lines: a model's answer, --info)."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text  # the common case, fast
    out = []
    for char in text:
        if keep_layout and char in "\n\t":
            out.append(char)
        elif _needs_escape(char):
            out.append(_escaped(char))
        else:
            out.append(char)
    return "".join(out)
