"""One way to filter a list by an enum column and cut it into pages, for every list the API and
the admin pages show (jobs, transfers, associations, audit).

``page`` counts from 1; ``page_size`` is the number of rows per page. The schemas bound both
(``web.schemas``), so an offset here always fits the database's integer range.
"""
from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import ColumnElement, Select, func, literal, select
from sqlalchemy.orm import Session

from dicom_node.web.errors import ServiceError


def enum_filter(column: Any, kind: type[enum.Enum], value: str | None, name: str) -> ColumnElement[bool]:
    """``column == kind(value)``, or true for no value; HTTP 422 naming the choices for a value
    that is not one of ``kind``'s (``name`` is the parameter as the client wrote it)."""
    if not value:
        return literal(True)
    try:
        return column == kind(value)
    except ValueError:
        raise ServiceError(422, f"{name} {value!r} is not one of {[x.value for x in kind]}") from None


def page_of(s: Session, query: Select, count_from: Any, cond: ColumnElement[bool], order: Any,
            page: int, page_size: int) -> tuple[list, int]:
    """The rows of ``query`` on page ``page`` (newest first by ``order``) and the total count of
    ``count_from`` rows meeting ``cond``."""
    total = s.scalar(select(func.count()).select_from(count_from).where(cond)) or 0
    rows = s.execute(query.where(cond).order_by(order).offset((page - 1) * page_size).limit(page_size))
    return list(rows), int(total)
