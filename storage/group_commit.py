"""Group commit: the short write transactions of concurrent callers run as one.

The listener indexes every received instance in its own small transaction before it answers
Success. With several associations at once, most of the cost of such a transaction is its
BEGIN and COMMIT (round trips, and on PostgreSQL a WAL flush per commit), not its one
statement. ``GroupCommit.run(fn)`` lets callers share them:

- the first caller that finds no batch running leads one: it takes its own function and the
  others waiting (up to ``max_batch``), runs them in one transaction (``begin()``, e.g.
  ``Sessions.begin_connection``) in a fixed order (``order_key``), commits, and hands each its
  result;
- callers that arrive while a batch runs wait, and are taken by the next leader; a lone caller
  is a batch of one and waits for nobody;
- a caller gets its result only after the commit that made it durable (nothing is reported
  written that a rollback could undo);
- when a batch of several fails (any function raises, or the commit fails) it is rolled back
  and each caller runs its own function again, alone, in its own transaction, after calling its
  ``reset`` (e.g. to drop rows it cached from the rolled-back transaction): so an error reaches
  exactly the caller whose data caused it, with the same exception as without batching. A
  batch of one that fails raises its error to its caller directly.

The fixed order (``order_key``, e.g. series then SOP Instance UID) keeps the row locks that
concurrent batches take (PostgreSQL, several listener processes) in one order, so they do not
deadlock in the common case; a rare deadlock is detected by PostgreSQL and ends as a failed
batch, whose callers then run alone.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

#: Most functions in one transaction: bounds how long one batch holds its locks.
MAX_BATCH = 32

_PENDING, _DONE, _FAILED, _ALONE = range(4)


class _Item:
    __slots__ = ("fn", "key", "state", "result", "error")

    def __init__(self, fn: Callable[[Any], Any], key: Any):
        self.fn, self.key = fn, key
        self.state, self.result, self.error = _PENDING, None, None


class GroupCommit:
    """Runs concurrent callers' functions of a connection in shared transactions (see module doc).

    ``begin``: a function returning a context manager that yields a connection in a write
    transaction and commits on a clean exit (rolls back on an exception).
    """

    def __init__(self, begin: Callable[[], AbstractContextManager], max_batch: int = MAX_BATCH):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._begin = begin
        self._max = max_batch
        self._cond = threading.Condition()
        self._waiting: list[_Item] = []
        self._leading = False
        #: Batches committed and functions committed in them (for figures and tests).
        self.batches = 0
        self.committed = 0
        #: Batches of several that failed, so that their callers ran alone.
        self.split = 0

    def run(self, fn: Callable[[Any], Any], *, order_key: Any = "", reset: Callable[[], None] | None = None) -> Any:
        """``fn(conn)`` inside a committed write transaction, possibly shared; returns its result.

        Raises what ``fn`` (or the commit) raised when it ran alone. ``reset`` is called before
        ``fn`` runs again alone after a failed batch. ``order_key``: the order within a batch.
        """
        item = _Item(fn, order_key)
        with self._cond:
            self._waiting.append(item)
            while self._leading and item.state == _PENDING:
                self._cond.wait()
            batch = None
            if item.state == _PENDING:  # no batch running, and ours not yet taken: lead one
                self._leading = True
                others = [i for i in self._waiting if i is not item][: self._max - 1]
                batch = [item, *others]
                taken = {id(i) for i in batch}
                self._waiting = [i for i in self._waiting if id(i) not in taken]
        if batch is not None:
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if item.state == _DONE:
            return item.result
        if item.state == _FAILED:
            raise item.error
        # A failed batch of several: this caller's function again, alone.
        if reset is not None:
            reset()
        with self._begin() as conn:
            return fn(conn)

    def _run_batch(self, batch: list[_Item]) -> None:
        batch.sort(key=lambda i: i.key)
        try:
            with self._begin() as conn:
                results = [i.fn(conn) for i in batch]
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].state, batch[0].error = _FAILED, exc
                if not isinstance(exc, Exception):
                    raise
                return
            self.split += 1
            for i in batch:
                i.state = _ALONE
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.committed += len(batch)
        for i, result in zip(batch, results):
            i.result, i.state = result, _DONE
