"""One way to quote an exception in a one-line message (skip logs, error summaries)."""
from __future__ import annotations

LIMIT = 300   # characters of an error's first line that a message quotes


def first_line(e: BaseException) -> str:
    """The first non-empty-stripped line of an error's message, cut to `LIMIT` characters."""
    return (str(e).strip().splitlines() or [""])[0][:LIMIT]


def describe(e: BaseException) -> str:
    """'Type: first line' of an error. GDAL's 'see previous exception' means its cause says
    more, so that cause is described instead."""
    if e.__cause__ is not None and "previous exception" in str(e):
        e = e.__cause__
    return f"{type(e).__name__}: {first_line(e)}"
