"""Destination kind "dicom": C-STORE over one association, negotiated per object.

Presentation contexts are proposed per SOP class (``_contexts``): the file's own transfer
syntax, Explicit/Implicit VR Little Endian, and for forwarded images JPEG 2000 lossless and RLE
lossless as transcoding targets; beside the Comprehensive 3D SR the Comprehensive SR class (its
fallback). Then, object by object:

* the SOP class is not accepted: a 3D SR is replaced by its Comprehensive SR (``sr_fallback =
  "comprehensive"``, the default) if that class is accepted; otherwise the object FAILS with the
  reason and the others go on;
* the file's transfer syntax is not accepted: the dataset is decoded and sent in an accepted
  uncompressed syntax, or encoded in an accepted lossless one (pydicom + pylibjpeg);
* a refused status fails that object (0xA7xx, out of resources, is transient: retried later);
  a lost association or a missing response stops the send (transient).
"""
from __future__ import annotations

import io
import logging

from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    UID,
)
from pynetdicom import AE

from dicom_node import scu
from dicom_node.destinations import (
    FAILED,
    SENT,
    Context,
    Delivery,
    ObjectStatus,
    OutObject,
    Target,
    send_order,
    summarise,
)
from dicom_node.results.sr_comprehensive import COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, comprehensive_sr

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_LOSSLESS = (JPEG2000Lossless, RLELossless)


def _accepted(assoc) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out


def _reencoded(ds, ts: str):
    """``ds`` written in ``ts`` (an uncompressed one, or a compressed ``ds`` already in ``ts``)
    and read back, so its encoding and file meta agree."""
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=(ts == ImplicitVRLittleEndian), little_endian=True, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def _fit_syntax(ds, accepted: set[str]):
    """``ds`` in a transfer syntax the peer accepted (transcoded if needed: decoded to an
    uncompressed syntax, or encoded lossless), or a reason string."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in accepted:
        return ds
    plain = [t for t in _UNCOMPRESSED if t in accepted]
    if plain:
        if UID(ts).is_compressed:
            ds.decompress(generate_instance_uid=False)  # to Explicit VR Little Endian (pylibjpeg decoders)
        return _reencoded(ds, plain[0])
    for target in _LOSSLESS:
        if target in accepted and "PixelData" in ds:
            if UID(ts).is_compressed:
                ds.decompress(generate_instance_uid=False)
            ds.compress(target, generate_instance_uid=False)  # pylibjpeg-openjpeg (JPEG 2000) or pydicom's own RLE encoder
            return _reencoded(ds, target)
    return f"accepts none of its transfer syntaxes (has {ts}; peer takes {sorted(accepted)})"


def _contexts(datasets, fallback: str) -> list[tuple[str, list[str]]]:
    """Presentation contexts to propose: per SOP class one per own transfer syntax, one with the
    uncompressed syntaxes, and for images the lossless ones (transcoding targets); Comprehensive
    SR beside a 3D SR when the fallback is on. At most 128 (PS3.8)."""
    out: dict[tuple[str, tuple[str, ...]], None] = {}
    for obj, ds in datasets:
        sop_class = str(ds.SOPClassUID)
        own = str(ds.file_meta.TransferSyntaxUID)
        if own not in _UNCOMPRESSED:
            out[(sop_class, (own,))] = None
        out[(sop_class, _UNCOMPRESSED)] = None
        if obj.kind == "original" and "PixelData" in ds:
            for ts in _LOSSLESS:
                out[(sop_class, (ts,))] = None
        if sop_class == COMPREHENSIVE_3D_SR and fallback == "comprehensive":
            out[(COMPREHENSIVE_SR, _UNCOMPRESSED)] = None
    return [(c, list(ts)) for c, ts in out][:128]


class DicomKind:
    name = "dicom"

    def echo(self, target: Target, ctx: Context) -> scu.Outcome:
        return scu.echo(target.ae_title, target.host, target.port, calling_ae=ctx.calling_ae,
                        timeout=min(ctx.timeout, 10.0), tls=ctx.tls if target.tls else None)

    def send(self, target: Target, objects: list[OutObject], ctx: Context) -> Delivery:
        objects = send_order(objects)
        statuses: dict[str, ObjectStatus] = {}
        if not objects:
            return Delivery(scu.Outcome(scu.Kind.OK, "nothing left to send"), statuses)
        tls_args = scu._tls_args(ctx.tls if target.tls else None, target.host)
        if isinstance(tls_args, scu.Outcome):
            return Delivery(tls_args, statuses)
        datasets = [(o, dcmread(o.path)) for o in objects]
        fallback = target.options.get("sr_fallback", "comprehensive")
        ae = AE(ae_title=ctx.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = ctx.timeout
        for sop_class, syntaxes in _contexts(datasets, fallback):
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            return Delivery(scu._association_failure(assoc, target.ae_title, target.host, target.port, tls_args),
                            statuses)
        transient: scu.Outcome | None = None
        try:
            accepted = _accepted(assoc)
            for obj, ds in datasets:
                sop_class = str(ds.SOPClassUID)
                sent_as = None
                if sop_class not in accepted:
                    if sop_class == COMPREHENSIVE_3D_SR and fallback == "comprehensive" and COMPREHENSIVE_SR in accepted:
                        ds = comprehensive_sr(ds)
                        sop_class, sent_as = COMPREHENSIVE_SR, str(ds.SOPInstanceUID)
                        log.info("%s accepts no Comprehensive 3D SR: sending %s as Comprehensive SR %s",
                                 target.ae_title, obj.sop_instance_uid, sent_as)
                    else:
                        what = "Comprehensive 3D SR" if sop_class == COMPREHENSIVE_3D_SR else "SOP class"
                        statuses[obj.sop_instance_uid] = ObjectStatus(
                            FAILED, f"{target.ae_title} accepts no {what} {sop_class}"
                            + (" (sr_fallback = fail)" if sop_class == COMPREHENSIVE_3D_SR and fallback == "fail" else ""))
                        continue
                fitted = _fit_syntax(ds, accepted[sop_class])
                if isinstance(fitted, str):
                    statuses[obj.sop_instance_uid] = ObjectStatus(FAILED, f"{target.ae_title} {fitted}")
                    continue
                status = assoc.send_c_store(fitted)
                if status is None or "Status" not in status:
                    transient = scu.Outcome(scu.Kind.TRANSIENT,
                                            f"no C-STORE response from {target.ae_title} for {obj.sop_instance_uid}")
                    break
                if scu.status_is_success(status.Status):
                    statuses[obj.sop_instance_uid] = ObjectStatus(SENT, None, sent_as)
                    log.info("stored %s on %s (status 0x%04X)", sent_as or obj.sop_instance_uid, target.ae_title,
                             status.Status)
                elif 0xA700 <= status.Status <= 0xA7FF:  # out of resources: may clear
                    transient = scu.Outcome(scu.Kind.TRANSIENT, f"{target.ae_title} refused {obj.sop_instance_uid} "
                                                                f"with status 0x{status.Status:04X}")
                    break
                else:
                    statuses[obj.sop_instance_uid] = ObjectStatus(
                        FAILED, f"{target.ae_title} refused {obj.sop_instance_uid} with status 0x{status.Status:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return Delivery(summarise(statuses, transient), statuses)
