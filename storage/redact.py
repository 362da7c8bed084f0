"""A safety net that keeps SQL parameters (patient names and IDs among them) out of logs.

The engines are built with ``hide_parameters=True`` (``storage.db.make_engine``), so SQLAlchemy
does not put bound values in its exception text. This module scrubs what could still carry
values, from every log record of the process, whatever handler writes it:

* ``[parameters: ...]`` sections of SQLAlchemy exception text (an engine built elsewhere),
* PostgreSQL's ``DETAIL:`` lines (``Failing row contains (...)``, ``Key (...)=(...)``),

in the message, in exception arguments and in the formatted traceback (``exc_text``).
``install()`` wraps the log record factory once per process; it is called by ``make_engine``.
"""
from __future__ import annotations

import logging
import re
import threading
import traceback

# From "[parameters:" to SQLAlchemy's "(Background on this error" line, else to the end of the line.
_PARAMS = re.compile(r"\[parameters: .*?(?=\n\(Background on this error)|\[parameters: [^\n]*", re.DOTALL)
_DETAIL = re.compile(r"^(\s*DETAIL:).*$", re.MULTILINE)
_HIDDEN = "[SQL parameters hidden]"
_MARKERS = ("[parameters:", "DETAIL:")

_installed = False
_lock = threading.Lock()


def scrub(text: str) -> str:
    """``text`` without SQL parameter dumps and PostgreSQL DETAIL values."""
    if not any(m in text for m in _MARKERS):
        return text
    text = _PARAMS.sub(_HIDDEN, text)
    return _DETAIL.sub(r"\1 (hidden)", text)


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub one record in place (message, arguments, traceback); returns it."""
    if isinstance(record.msg, str):
        record.msg = scrub(record.msg)
    if record.args:
        if isinstance(record.args, dict):
            record.args = {k: scrub(str(v)) if isinstance(v, BaseException) else v for k, v in record.args.items()}
        else:
            record.args = tuple(scrub(str(a)) if isinstance(a, BaseException) or isinstance(a, str) else a
                                for a in record.args)
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if any(m in str(e) for e in _chain(record.exc_info[1]) for m in _MARKERS) or any(m in text for m in _MARKERS):
            # Formatters use exc_text when it is set; keep exc_info for handlers that need the type.
            record.exc_text = scrub(text)
    return record


class ScrubSQLParameters(logging.Filter):
    """A ``logging.Filter`` for handlers configured elsewhere; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


def install() -> None:
    """Scrub every log record of this process at creation (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            return scrub_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
