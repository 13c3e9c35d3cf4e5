"""runtime.terminal: what a terminal would act on is shown, never obeyed (issue 16, finding 11)."""

import pytest

from runtime.terminal import printable

ATTACKS = {
    "\x1b]0;pwned\x07": "\\x1b]0;pwned\\x07",  # set the window title
    "a\x1b[2J\x1b[Hb": "a\\x1b[2J\\x1b[Hb",  # clear the screen, cursor home
    "ok\rEVIL": "ok\\x0dEVIL",  # overwrite the line
    "x\x9b31mred": "x\\x9b31mred",  # C1 CSI
    "safe\u202egnp.exe": "safe\\u202egnp.exe",  # right-to-left override
    "a\u2028b": "a\\u2028b",
    "del\x7f": "del\\x7f",
    "two\nlines": "two\\x0alines",
}


@pytest.mark.parametrize("text, shown", ATTACKS.items())
def test_controls_are_shown_as_escapes(text, shown):
    assert printable(text) == shown
    assert all(c.isprintable() for c in printable(text))


def test_ordinary_text_is_unchanged():
    for text in ["Gemma 3 270m", "Llama-3.1 8B Instruct", "Qwën 2.5 — 中文", "👩‍💻 coder",
                 "tab\tstays? no", 42]:
        out = printable(text)
        assert out == str(text).replace("\t", "\\x09")


def test_newlines_and_tabs_may_stay():
    assert printable("a\nb\x1b\tc\r", keep_layout=True) == "a\nb\\x1b\tc\\x0d"
