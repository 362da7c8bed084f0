"""The listener's refusal reasons: the audited text and the small fixed set of categories.

Every refusal the listener makes is written to the association log (``associations.reason``)
as one of the sentences built here; ``/metrics`` counts them by category, matching the
sentence's fixed opening. This module imports nothing, so the web's metrics can use it without
pulling in pynetdicom.
"""
from __future__ import annotations

#: category -> the fixed opening of every reason in that category. Order matters only for
#: readability; the openings do not overlap.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "request_timeout": ("association request not complete after",),
    "request_too_large": ("association request declares PDU length",),
    "pdu_too_large": ("declared PDU length", "DIMSE command set exceeds"),
    "idle_timeout": ("no complete PDU for",),
    "pending_limit": ("too many connections waiting",),
    "max_associations": ("maximum associations reached",),
    "per_peer_limit": ("too many associations from",),
    "dataset_too_large": ("dataset exceeds",),
    "called_ae": ("called AE title",),
    "calling_ae": ("calling AE title", "source "),
    "malformed": ("connection closed without a valid association request",),
}


def category(reason: str | None) -> str | None:
    """The category of an audited reason, or None for reasons that are not refusals."""
    if not reason:
        return None
    for name, openings in CATEGORIES.items():
        if reason.startswith(openings):
            return name
    return None


def request_timeout(seconds: float) -> str:
    return f"association request not complete after {seconds:g} s (association_request_timeout)"


def request_too_large(declared: int, cap: int) -> str:
    return f"association request declares PDU length {declared} bytes, more than max_request_pdu {cap}"


def pdu_too_large(declared: int, cap: int) -> str:
    return f"declared PDU length {declared} bytes exceeds {cap} (max_pdu)"


def idle_timeout(seconds: float) -> str:
    return f"no complete PDU for {seconds:g} s (idle_timeout)"


def pending_limit(limit: int) -> str:
    return (f"too many connections waiting to send an association request ({limit}): "
            "the oldest was cut")


def max_associations(limit: int) -> str:
    return f"maximum associations reached ({limit}, max_associations)"


def per_peer_limit(host: str | None, limit: int) -> str:
    return f"too many associations from {host} ({limit}, max_associations_per_peer)"


def dataset_too_large(cap: int, *, inflated: bool) -> str:
    after = " after inflation" if inflated else ""
    return f"dataset exceeds {cap} bytes{after} (max_dataset_bytes)"


MALFORMED = "connection closed without a valid association request (malformed PDU or connection lost)"


def command_too_large(cap: int) -> str:
    return f"DIMSE command set exceeds {cap} bytes"
