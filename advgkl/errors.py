"""The one exception type a user can cause; the CLI prints its message without a traceback."""
from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, paths): the message says what to do."""


def did_you_mean(value, allowed) -> str:
    """'; did you mean 'gkl_at'?' when one allowed name is close to ``value`` (case ignored), else ''."""
    names = {str(a).lower(): str(a) for a in allowed}
    close = difflib.get_close_matches(str(value).lower(), list(names), n=1, cutoff=0.7)
    return f"; did you mean {names[close[0]]!r}?" if close else ""
