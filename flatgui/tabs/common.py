"""What every tab's handlers share: turning an exception into the one-line message the page shows."""
from __future__ import annotations

import logging

from core.errors import FlatQuantError
from core.validate import safe_message

from ..runner import BusyError, readable_error

log = logging.getLogger("flatgui")
# Marks that render with the fonts every browser has (DejaVu); colour emoji need an extra font on Linux.
OK = "✔ "
ERR = "✖"


def fail(exc: BaseException) -> str:
    """The one line the page shows next to the button (no toast: an error is shown once); user errors keep core's
    message without the server's own paths, anything else is logged in full."""
    if isinstance(exc, (FlatQuantError, BusyError)):
        text = str(exc)
    else:
        log.exception("handler failed")
        text = readable_error(exc)
    return f"{ERR} {safe_message(text)}"
