"""Destination kinds behind one registry, each owning ``send`` and ``echo``.

A kind is a class with ``send(dest, objects, ctx) -> Delivery`` and ``echo(dest, ctx) ->
scu.Outcome`` (mercure's target types). ``KINDS`` maps ``destinations.kind`` to an instance:

* ``"dicom"``: C-STORE to ``ae_title@host:port`` (``dicom.py``), DICOM TLS when ``tls``; the
  echo is a C-ECHO.
* ``"dicomweb"``: STOW-RS to ``url`` (``dicomweb.py``), with an optional Authorization header;
  the echo is a QIDO-RS probe (``GET {url}/studies?limit=1``).

Negotiation is per object: objects go in ``send_order`` (forwarded originals, then SEG, key
images, and the SR last, so an SR never arrives before the SEG it references); a peer that
accepts no Comprehensive 3D SR gets a Comprehensive SR without SCOORD3D
(``dicom_node.results.sr_comprehensive``) or, with ``sr_fallback = "fail"``, that one object
fails with its reason while the others go; forwarded originals are transcoded when the peer
accepts only other transfer syntaxes. Each object ends with its own status (``ObjectStatus``)
which the dispatcher records in ``transfers.object_status``.

A new kind is a module here and one line in ``KINDS``; the dispatch loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dicom_node import scu

#: ``ObjectStatus.state`` values.
PENDING, SENT, FAILED = "pending", "sent", "failed"

#: Send order by object kind: originals first, the SR (which references the SEG) last.
_ORDER = {"original": 0, "seg": 1, "sc": 2, "sr": 3}


@dataclass(frozen=True)
class OutObject:
    """One object to deliver: a result the node wrote, or a received instance to forward."""

    sop_instance_uid: str
    sop_class_uid: str
    kind: str  # "sr", "seg", "sc" or "original"
    path: Path


@dataclass
class ObjectStatus:
    state: str  # PENDING, SENT or FAILED
    reason: str | None = None
    sent_as: str | None = None  # the SOP Instance UID sent in its place (a Comprehensive SR fallback)

    def as_json(self) -> dict:
        return {"state": self.state, "reason": self.reason, "sent_as": self.sent_as}


@dataclass
class Delivery:
    """What one ``send`` did: the overall outcome (``OK`` only when every object was sent;
    ``PERMANENT`` when some failed for good and none is left to retry; ``TRANSIENT`` when a
    retry may help) and the status of each object, by SOP Instance UID."""

    outcome: scu.Outcome
    objects: dict[str, ObjectStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """What a kind needs of a destination row, detached from the database session."""

    name: str
    kind: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    url: str | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, row) -> Target:
        return cls(name=row.name, kind=row.kind or "dicom", ae_title=row.ae_title, host=row.host, port=row.port,
                   tls=bool(row.tls), url=row.url, options=dict(row.options or {}))

    def describe(self) -> str:
        return self.url if self.kind == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Context:
    """Node-side settings for a send or echo: calling AE title, timeout (seconds), [tls]."""

    calling_ae: str
    timeout: float
    tls: object | None = None


def send_order(objects: list[OutObject]) -> list[OutObject]:
    return sorted(objects, key=lambda o: _ORDER.get(o.kind, 2))


def summarise(objects: dict[str, ObjectStatus], transient: scu.Outcome | None) -> scu.Outcome:
    """The overall outcome from per-object statuses (``transient``: a failure a retry may fix)."""
    sent = [u for u, st in objects.items() if st.state == SENT]
    failed = {u: st for u, st in objects.items() if st.state == FAILED}
    if transient is not None:
        transient.acknowledged = sent
        return transient
    if failed:
        reasons = "; ".join(f"{u}: {st.reason}" for u, st in failed.items())
        return scu.Outcome(scu.Kind.PERMANENT, f"{len(failed)} of {len(objects)} object(s) failed: {reasons}", sent)
    return scu.Outcome(scu.Kind.OK, f"{len(sent)} object(s) delivered", sent)


def _kinds():
    from dicom_node.destinations.dicom import DicomKind
    from dicom_node.destinations.dicomweb import DicomWebKind

    return {"dicom": DicomKind(), "dicomweb": DicomWebKind()}


KINDS = _kinds()


def kind_of(target: Target):
    """The kind handler for ``target``; raises ValueError naming an unknown kind."""
    try:
        return KINDS[target.kind]
    except KeyError:
        raise ValueError(f"destination {target.name!r} has unknown kind {target.kind!r}; "
                         f"known: {sorted(KINDS)}") from None


def echo(row, ctx: Context) -> scu.Outcome:
    """The connectivity test of the destination ``row`` (C-ECHO, or a QIDO-RS probe)."""
    target = Target.of(row)
    return kind_of(target).echo(target, ctx)
