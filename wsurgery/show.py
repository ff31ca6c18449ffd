"""How shapes and values read from files appear in messages: one line, bounded. One home
for it, so every error shows a shape and a hostile value the same way."""

from __future__ import annotations

from collections.abc import Iterable


def shape_text(shape: Iterable[int]) -> str:
    """``(32, 8)``; ``(8)`` for one dimension, ``()`` for none."""
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def short(value, limit: int = 80) -> str:
    """A bounded ``repr`` of a value from a file: at most ``limit`` characters, and never
    the decimal digits of a huge integer (which cost quadratic time, and past 4300 digits
    raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:
        value = type(value)(list(value)[:limit]) if not isinstance(value, dict) else dict(list(value.items())[:limit])
    try:
        text = repr(value)
    except ValueError:  # an integer too long for a string, nested inside
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
