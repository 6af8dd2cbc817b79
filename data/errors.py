"""The error every layer raises for a problem the user can fix, and its 'did you mean' hint.

`ConfigError` messages are one line naming the culprit (a recipe key, a plugin, a column, a model id); the
command line prints them without a traceback and exits with code 2. Data, rewards and the runner all raise
it (the runner calls it `RecipeError`), so one `except` catches them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A problem the user can fix; the message is one line."""


def closest(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
