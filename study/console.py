"""The console a user reads: rich, on stderr, with the password of any URI it prints masked.

A store URI may carry credentials (`postgresql://user:pw@host/db`, `http://user:pw@host`), and
the start line, the error lines and the store's own errors (which echo request URLs) name it;
`redact` masks them wherever such a line is made or printed."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console

# scheme://user:password@ -> scheme://user:***@ (a user without a password is kept as it is)
_CREDENTIALS = re.compile(r"\b([a-zA-Z][\w+.-]*://[^\s/:@]*):[^\s/@]*@")


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it masked."""
    return _CREDENTIALS.sub(r"\1:***@", text)


class SafeConsole(Console):
    """A rich `Console` whose printed strings pass through `redact`."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


def console() -> SafeConsole:
    """The progress and error console: stderr, no highlighting, long lines kept whole."""
    return SafeConsole(stderr=True, highlight=False, soft_wrap=True)
