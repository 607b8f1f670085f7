"""Argument checks shared by the public callbacks and functions.

Messages follow Keras': ``Invalid value for argument `x`. Received: x=...
Expected ...``, plus a close-match suggestion for enum-like values.
"""

import difflib


def is_int(value):
    """An int that is not a bool (`True` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid(name, value, expected, hint=""):
    """Raises Keras' `ValueError` for argument `name`."""
    raise ValueError(
        f"Invalid value for argument `{name}`. Received: {name}={value!r}. "
        f"{hint}Expected {expected}."
    )


def suggestion(value, choices):
    """`'Did you mean "latest"? '` for a near miss among `choices`, else ''."""
    if not isinstance(value, str):
        return ""
    words = [c for c in choices if isinstance(c, str)]
    match = difflib.get_close_matches(value, words, n=1, cutoff=0.6)
    if not match:
        lowered = {w.lower(): w for w in words}
        match = [lowered[value.lower()]] if value.lower() in lowered else []
    return f'Did you mean "{match[0]}"? ' if match else ""


def check_choice(name, value, choices):
    """Raises unless `value` is one of `choices`, suggesting a close match."""
    if any(value is c or (value == c and type(value) is type(c))
           for c in choices):
        return
    expected = ", ".join("None" if c is None else repr(c) for c in choices)
    invalid(name, value, f"one of {expected}", suggestion(value, choices))
