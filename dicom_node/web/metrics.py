"""Prometheus metrics computed from the database at scrape time.

Every stage records what it did in the shared database, so a custom collector that counts rows
when ``/metrics`` is scraped is right however many listener, worker and dispatcher processes
run on however many hosts (in-process counters would each see only their own process). The
queries are a handful of ``GROUP BY`` counts on indexed columns.
"""
from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select

from dicom_node import scp_reasons
from storage.models import (
    AssociationLog,
    AssociationResult,
    Instance,
    Job,
    JobState,
    Study,
    StudyStatus,
    Transfer,
    TransferState,
    User,
)

log = logging.getLogger(__name__)


def _refusal_category():
    """SQL: the listener refusal category of an association row's reason (NULL if none)."""
    return case(*[(AssociationLog.reason.startswith(opening, autoescape=True), name)
                  for name, openings in scp_reasons.CATEGORIES.items() for opening in openings],
                else_=None).label("category")


class DatabaseCollector(Collector):
    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        with self.sessions() as s:
            # Received (C-STORE, STOW-RS), not the node's own results indexed for DICOMweb.
            instances = s.scalar(select(func.count()).select_from(Instance)
                                 .where(~Instance.path.startswith("results/"))) or 0
            assoc = s.execute(select(AssociationLog.direction, AssociationLog.result, func.count())
                              .group_by(AssociationLog.direction, AssociationLog.result)).all()
            jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            inf_sum, inf_count = s.execute(select(func.coalesce(func.sum(Job.inference_seconds), 0.0),
                                                  func.count(Job.inference_seconds))).one()
            transfers = dict(s.execute(select(Transfer.state, func.count()).group_by(Transfer.state)).all())
            studies = dict(s.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            n_users = s.scalar(select(func.count()).select_from(User)) or 0
            cat = _refusal_category()
            refusals = dict(s.execute(select(cat, func.count()).where(AssociationLog.direction == "in")
                                      .where(AssociationLog.reason.is_not(None)).group_by("category")).all())

        yield CounterMetricFamily("dicom_node_instances_received", "DICOM instances received and stored", value=instances)

        c = CounterMetricFamily("dicom_node_associations", "Associations by direction and result",
                                labels=["direction", "result"])
        seen = {(d, r.value if hasattr(r, "value") else str(r)): n for d, r, n in assoc}
        for result in AssociationResult:
            seen.setdefault(("in", result.value), 0)
        for (direction, result), n in sorted(seen.items()):
            c.add_metric([direction or "in", result], n)
        yield c

        r = CounterMetricFamily("dicom_node_listener_refusals",
                                "Connections, associations and instances the listener refused, by reason "
                                "(associations with refused instances count once)", labels=["reason"])
        for name in scp_reasons.CATEGORIES:
            r.add_metric([name], refusals.get(name, 0))
        yield r

        g = GaugeMetricFamily("dicom_node_jobs", "Inference jobs by state", labels=["state"])
        for state in JobState:
            g.add_metric([state.value], jobs.get(state, 0))
        yield g

        yield SummaryMetricFamily("dicom_node_inference_seconds", "Model inference time of finished jobs",
                                  count_value=int(inf_count or 0), sum_value=float(inf_sum or 0.0))

        t = GaugeMetricFamily("dicom_node_transfers", "Result transfers by state (sent, failed, ...)", labels=["state"])
        for state in TransferState:
            t.add_metric([state.value], transfers.get(state, 0))
        yield t

        st = GaugeMetricFamily("dicom_node_studies", "Studies by AI status", labels=["status"])
        for status in StudyStatus:
            st.add_metric([status.value], studies.get(status, 0))
        yield st

        yield GaugeMetricFamily("dicom_node_web_users", "Web user accounts", value=n_users)


def make_registry(sessions) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return registry
