"""What every tab's handlers share: turning an exception into the one-line message the page shows."""
from __future__ import annotations

import logging

import gradio as gr

from core.errors import FlatQuantError

from ..runner import BusyError, readable_error

log = logging.getLogger("flatgui")
# Marks that render with the fonts every browser has (DejaVu); colour emoji need an extra font on Linux.
OK = "✔ "
ERR = "✖"


def fail(exc: BaseException) -> str:
    """A toast plus the returned line; user errors keep core's message, anything else is logged in full."""
    if isinstance(exc, (FlatQuantError, BusyError)):
        text = str(exc)
    else:
        log.exception("handler failed")
        text = readable_error(exc)
    gr.Warning(text)
    return f"{ERR} {text}"
