"""Text from files made safe for a terminal (no typer, no rich: error lines use it too)."""

from __future__ import annotations

import re

# C0 and C1 controls, and the characters that reorder or break lines on a terminal:
# bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069), marks (U+200E,
# U+200F, U+061C) and the Unicode line and paragraph separators.
_CONTROLS = "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
_CONTROL: list[re.Pattern[str]] = []  # compiled on first use: plain ASCII text never needs it
LONG = 400  # characters of a name or value shown in human output; longer ones are cut in the middle


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def safe(text: object, limit: int = LONG) -> str:
    """Names and metadata come from files: escape control and bidirectional characters (a
    hostile name must not send escape sequences to the terminal or reorder what it shows),
    and shorten absurdly long text (over ``limit`` characters) in the middle, with a
    marker, in linear time."""
    text = str(text)
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[: limit // 2]}...[{cut:,} characters]...{text[-limit // 2 :]}"
    if text.isascii() and text.isprintable():  # no control character (most text): as it is
        return text
    if not _CONTROL:
        _CONTROL.append(re.compile(_CONTROLS))
    return _CONTROL[0].sub(_escape, text)
