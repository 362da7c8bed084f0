"""Group commit (``storage.group_commit``) on real databases, and in the listener with real senders.

Each test forces concurrency (a slow first batch, so that the others queue behind it) and
checks what a caller may rely on: its own result, after a commit; its own error, and nobody
else's; every row exactly once.
"""
from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select
from sqlalchemy.exc import IntegrityError

from storage.group_commit import GroupCommit
from tests.peers import need, need_lidc

rows = MetaData()
items = Table("items", rows, Column("id", Integer, primary_key=True), Column("name", String(40), unique=True))


@pytest.fixture
def engine(db_url):
    eng = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    rows.create_all(eng)
    yield eng
    eng.dispose()


def _insert(name: str, delay: float = 0.0):
    def fn(conn):
        if delay:
            time.sleep(delay)
        return conn.execute(items.insert().values(name=name).returning(items.c.id)).scalar()
    return fn


def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(items))


def _run_queued(gc: GroupCommit, fns: list, keys: list | None = None, resets: list | None = None) -> list:
    """Run ``fns[0]`` first (slow: the others queue behind it), then the rest at once; returns
    each caller's result or exception, in order."""
    out: list = [None] * len(fns)

    def call(k):
        try:
            out[k] = gc.run(fns[k], order_key=(keys or [""] * len(fns))[k],
                            reset=(resets or [None] * len(fns))[k])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[k] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.2)  # the first batch is running (its function sleeps)
    with ThreadPoolExecutor(len(fns) - 1) as pool:
        list(pool.map(call, range(1, len(fns))))
    first.join()
    return out


def test_concurrent_callers_share_transactions_and_each_gets_its_own_result(engine):
    gc = GroupCommit(engine.begin)
    names = [f"n{k}" for k in range(12)]
    fns = [_insert(names[0], delay=0.6)] + [_insert(n) for n in names[1:]]
    out = _run_queued(gc, fns)
    assert gc.committed == 12
    assert gc.batches < 12, "the callers that queued behind the slow batch were not batched"
    with engine.connect() as conn:
        ids = dict(conn.execute(select(items.c.name, items.c.id)).all())
    assert [ids[n] for n in names] == out  # each caller got the id of its own row
    assert _count(engine) == 12


def test_a_failing_function_fails_only_its_caller_and_the_others_are_committed_once(engine):
    with engine.begin() as conn:
        conn.execute(items.insert().values(name="taken"))
    gc = GroupCommit(engine.begin)
    resets = [0] * 6

    def reset_of(k):
        def reset():
            resets[k] += 1
        return reset

    fns = [_insert("slow", delay=0.6), _insert("a"), _insert("taken"), _insert("b"), _insert("c"), _insert("d")]
    out = _run_queued(gc, fns, resets=[reset_of(k) for k in range(6)])
    assert isinstance(out[2], IntegrityError)
    assert all(isinstance(v, int) for k, v in enumerate(out) if k != 2), out
    assert gc.split >= 1  # the batch with "taken" was rolled back and its callers ran alone
    assert sum(resets) >= 2 and resets[0] == 0  # the first batch (alone) never failed
    with engine.connect() as conn:
        names = sorted(conn.scalars(select(items.c.name)))
    assert names == sorted(["taken", "slow", "a", "b", "c", "d"])  # each exactly once


def test_a_lone_caller_gets_its_error_directly_after_one_attempt(engine):
    gc = GroupCommit(engine.begin)
    gc.run(_insert("x"))
    calls = []

    def fn(conn):
        calls.append(1)
        return _insert("x")(conn)

    with pytest.raises(IntegrityError):
        gc.run(fn, reset=lambda: calls.append("reset"))
    assert calls == [1]  # not run twice, not reset
    assert _count(engine) == 1


def test_a_result_is_returned_only_after_its_commit(engine):
    gc = GroupCommit(engine.begin)
    seen = []

    def check_visible(name):
        def after():
            with engine.connect() as conn:  # another connection: sees committed rows only
                seen.append(conn.scalar(select(func.count()).select_from(items).where(items.c.name == name)))
        return after

    fns = [_insert("first", delay=0.4)] + [_insert(f"m{k}") for k in range(5)]
    out: list = [None] * len(fns)

    def call(k):
        out[k] = gc.run(fns[k])
        check_visible("first" if k == 0 else f"m{k - 1}")()

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(fns))]
    threads[0].start()
    time.sleep(0.1)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert seen == [1] * len(fns)


def test_batch_order_is_the_order_key(engine):
    gc = GroupCommit(engine.begin)
    order = []

    def fn(name, delay=0.0):
        def run(conn):
            order.append(name)
            time.sleep(delay)
        return run

    _run_queued(gc, [fn("slow", 0.5), fn("c"), fn("a"), fn("b")], keys=["0", "c", "a", "b"])
    assert order[0] == "slow" and order[1:] == ["a", "b", "c"]


# --- in the listener, with real senders ----------------------------------------------------------

@pytest.fixture
def listener(make_node, db_url):
    from dicom_node.scp import Listener

    node = make_node(db_url)
    scp = Listener(node)
    scp.start(0)
    yield scp
    scp.stop()


def test_concurrent_senders_into_the_listener_are_all_indexed_in_shared_transactions(listener, tmp_path):
    """Four DCMTK senders at once, each its own copy of a series (new UIDs): every instance
    acknowledged is indexed exactly once, and the listener shared index transactions."""
    need("storescu")
    series_dir = need_lidc()
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from storage.models import Instance

    files = sorted(series_dir.glob("*.dcm"))[:30]
    dirs = []
    for k in range(4):
        d = tmp_path / f"copy{k}"
        d.mkdir()
        study, series = generate_uid(), generate_uid()
        for f in files:
            ds = dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(d / f.name)
        dirs.append(d)

    def send(d):
        return subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "DICOM_NODE", "127.0.0.1",
                               str(listener.port), *map(str, sorted(d.iterdir()))],
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, dirs))
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    with listener.node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4 * len(files)
    gc = listener.index_commit
    assert gc.committed == 4 * len(files)
    assert gc.batches <= gc.committed
