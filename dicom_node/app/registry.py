"""The create / change / remove of one admin table whose rows are named by a unique column
(sources by AE title, destinations by name), each change audited in the same transaction as
``<noun>.add``, ``<noun>.update`` (with the row before and after) and ``<noun>.remove``.

The input model's fields are the row's columns; a field the model does not carry (for example a
destination's kind options) is kept by an update. Methods take the caller's session and never
commit. Refusals: :class:`~dicom_node.app.errors.NotFound` for an unknown name,
:class:`~dicom_node.app.errors.Conflict` for a name already taken, and whatever ``check`` raises.
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.app.errors import Conflict, NotFound
from storage import repo


class Registry:
    """``model``: the ORM class; ``key``: its unique column (and the input model's field);
    ``noun``: the word for one row in messages and audit actions; ``out``: row -> output model
    (the "before" of an update's audit record); ``check(session, data)``: a refusal beyond the
    input model's own validation (raises), run before every add and update."""

    def __init__(self, model: type, key: str, noun: str, out: Callable[[Any], BaseModel],
                 check: Callable[[Session, BaseModel], None] | None = None):
        self.model, self.key, self.noun, self.out, self.check = model, key, noun, out, check

    def find(self, s: Session, name: str):
        return s.scalar(select(self.model).where(getattr(self.model, self.key) == name))

    def get(self, s: Session, name: str):
        row = self.find(s, name)
        if row is None:
            raise NotFound(f"{self.noun} {name!r} not found")
        return row

    def _free(self, s: Session, name: str) -> None:
        if self.find(s, name) is not None:
            raise Conflict(f"{self.noun} {name!r} already exists")

    def add(self, s: Session, actor: str, data: BaseModel):
        name = getattr(data, self.key)
        self._free(s, name)
        if self.check:
            self.check(s, data)
        row = self.model(**data.model_dump())
        s.add(row)
        s.flush()
        repo.audit(s, actor, f"{self.noun}.add", name, data.model_dump())
        return row

    def update(self, s: Session, actor: str, name: str, data: BaseModel):
        row = self.get(s, name)
        if getattr(data, self.key) != name:
            self._free(s, getattr(data, self.key))
        if self.check:
            self.check(s, data)
        before = self.out(row).model_dump(exclude={"id"})
        for k, v in data.model_dump().items():
            setattr(row, k, v)
        s.flush()
        repo.audit(s, actor, f"{self.noun}.update", name, {"before": before, "after": data.model_dump()})
        return row

    def put(self, s: Session, actor: str, data: BaseModel) -> tuple[Any, bool]:
        """Add the row, or update the one of that name (the CLI's ``add``); (row, added)."""
        name = getattr(data, self.key)
        if self.find(s, name) is None:
            return self.add(s, actor, data), True
        return self.update(s, actor, name, data), False

    def remove(self, s: Session, actor: str, name: str) -> None:
        s.delete(self.get(s, name))
        s.flush()
        repo.audit(s, actor, f"{self.noun}.remove", name)
