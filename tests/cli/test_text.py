"""Text from files made safe for a terminal: every control, bidirectional and separator
character escaped, everything else as it is (plain ASCII takes a shortcut; it must agree)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from wsurgery.cli.text import _CONTROLS, _escape, safe

_PATTERN = re.compile(_CONTROLS)


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(codec="utf-8")) | st.text(st.characters(max_codepoint=0x7F)))
def test_safe_escapes_exactly_the_controls(text):
    assert safe(text, limit=10**6) == _PATTERN.sub(_escape, text)  # the shortcut changes nothing


def test_safe_escapes_what_would_move_the_terminal():
    assert safe("a\x1b[2Jb\tc\u202ed\x7f") == "a\\x1b[2Jb\\x09c\\u202ed\\x7f"
    assert safe("layers.0.weight") == "layers.0.weight"
    assert safe("\u00fcber") == "\u00fcber"
