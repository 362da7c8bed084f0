"""Benchmark: render the worklist with 1,000 studies (page and JSON API).

Fills a fresh database (SQLite in a temporary folder by default, or ``--database-url`` for
PostgreSQL, which must point at an empty database) with N studies in a realistic mix of AI
statuses and findings, then times, through the real HTTP stack (ASGI, middleware, session
cookie or bearer token, template rendering), each request R times and prints the median and
the worst time per request, and one JSON line per case with ``--json``.

Target (issue 4): no page needs more than a second to render a worklist of 1,000 studies.

    .venv/bin/python benchmarks/bench_worklist.py [--studies 1000] [--repeat 20] [--database-url URL]
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

STATUSES = ["done"] * 6 + ["received", "waiting", "processing", "not_eligible", "failed"]


def fill(node, n: int, seed: int = 1) -> None:
    from storage.models import Study, StudyStatus

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        status = StudyStatus(rng.choice(STATUSES))
        done = status is StudyStatus.DONE
        count = rng.choice([0, 0, 1, 1, 2, 3, 5]) if done else None
        rows.append(Study(
            study_instance_uid=f"1.2.826.0.1.3680043.10.{seed}.{i + 1}",
            patient_name=f"PATIENT{i:04d}^TEST", patient_id=f"P{i:06d}", accession_number=f"ACC{i:07d}",
            study_date=f"2025{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", modalities=rng.choice(["CT", "CT", "CR"]),
            study_description="CT CHEST", status=status,
            status_reason="slice spacing 5.0 mm is above 3.0 mm" if status is StudyStatus.NOT_ELIGIBLE else None,
            findings_count=count,
            max_diameter_mm=round(rng.uniform(3, 30), 1) if count else None,
            max_malignancy=round(rng.random(), 3) if count else None))
    with node.sessions.begin() as s:
        s.add_all(rows)


def time_get(client, url: str, repeat: int, headers: dict | None = None) -> tuple[float, float, int]:
    client.get(url, headers=headers)  # warm: templates compiled, connection pool filled
    times = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(url, headers=headers)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
        size = len(r.content)
    return statistics.median(times), max(times), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from fastapi.testclient import TestClient

    from dicom_node.config import Settings
    from dicom_node.node import open_node
    from dicom_node.web.app import create_app
    from dicom_node.web.security import hash_password
    from storage import users

    tmp = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
    settings = Settings(node={"data_dir": str(tmp)}, database={"url": args.database_url},
                        web={"secret_key": uuid.uuid4().hex})
    node = open_node(settings)
    with node.sessions.begin() as s:
        users.add_user(s, "bench", "radiologist", hash_password("bench-password"))
    t0 = time.perf_counter()
    fill(node, args.studies)
    fill_s = time.perf_counter() - t0

    with TestClient(create_app(node)) as client:
        token = client.post("/api/token", data={"username": "bench", "password": "bench-password"}).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        page = client.get("/login")
        import re

        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        client.post("/login", data={"username": "bench", "password": "bench-password", "csrf_token": csrf})
        cases = [
            ("page /worklist (50 rows, most suspicious first)", "/worklist", None),
            ("page /worklist last page", f"/worklist?page={max(1, (args.studies + 49) // 50)}", None),
            ("page /worklist search 'P0009'", "/worklist?q=P0009", None),
            ("page /worklist status=done, date range", "/worklist?status=done&date_from=2025-03-01&date_to=2025-09-30", None),
            ("page fragment (auto-refresh)", "/worklist?fragment=1", None),
            ("api /api/studies (50)", "/api/studies", bearer),
            ("api /api/studies (200, the maximum page)", "/api/studies?page_size=200", bearer),
            ("api /api/studies modality=CR", "/api/studies?modality=CR", bearer),
        ]
        backend = node.sessions.kw["bind"].dialect.name
        print(f"{args.studies} studies on {backend} (filled in {fill_s:.2f} s); {args.repeat} requests per case")
        for name, url, headers in cases:
            median, worst, size = time_get(client, url, args.repeat, headers)
            if args.json:
                print(json.dumps({"case": name, "url": url, "backend": backend, "studies": args.studies,
                                  "median_ms": round(median * 1000, 2), "max_ms": round(worst * 1000, 2), "bytes": size}))
            else:
                print(f"  {name:55s} median {median * 1000:7.1f} ms   max {worst * 1000:7.1f} ms   {size / 1024:6.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
