"""The listener's own Part 10 reading and writing (``dicom_node.part10``) against pydicom and
pynetdicom on real files: pydicom's test and character-set files, the shared samples and
LIDC-IDRI-0001 (when present). Nothing here depends on the machine's speed."""
from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node import ingest, part10
from tests.peers import DATA, LIDC_SERIES

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"


def _files() -> list[Path]:
    found = sorted((PYDICOM_DATA / "test_files").glob("*.dcm")) + sorted((PYDICOM_DATA / "charset_files").glob("*.dcm"))
    found += sorted((DATA / "dicom-samples").rglob("*.dcm"))
    if LIDC_SERIES.is_dir():
        found += sorted(LIDC_SERIES.iterdir())[:20]
    return found


def _split(data: bytes) -> tuple[str, bytes] | None:
    """(transfer syntax, dataset bytes) of a Part 10 file whose meta starts with its group length."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    (group_length,) = struct.unpack("<I", data[140:144])
    try:
        meta = pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        ts = str(meta.TransferSyntaxUID)
    except Exception:  # noqa: BLE001 - not a file these tests can use
        return None
    return ts, data[144 + group_length:]


def _meta(data: bytes, ts: str, dataset):  # noqa: ANN001
    try:
        return ingest.read_meta(data, ts, None, dataset=dataset)
    except ingest.Refused as exc:
        return ("refused", exc.status)


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_header_read_from_raw_bytes_equals_pydicoms(path):
    data = path.read_bytes()
    split = _split(data)
    if split is None:
        pytest.skip("no group-length file meta")
    ts, dataset = split
    assert _meta(data, ts, memoryview(dataset)) == _meta(data, ts, None)


def test_the_raw_reader_is_the_one_used_for_lidc():
    if not LIDC_SERIES.is_dir():
        pytest.skip(f"LIDC-IDRI-0001 not found at {LIDC_SERIES}")
    for path in sorted(LIDC_SERIES.iterdir())[:5]:
        ts, dataset = _split(path.read_bytes())
        raw = part10.header_elements(dataset, ts)
        assert raw is not None and len(raw) >= 10


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "A1"
    ds.Modality = "CT"
    ds.StudyDescription = "Thorax \u00e9"
    ds.PatientName = "M\u00fcller^J\u00fcrgen"
    ds.PatientID = "P\u00e91"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SeriesNumber = "7"
    ds.InstanceNumber = "12"
    ds.Rows = 2
    return ds


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_synthetic_headers_in_both_vr_encodings(implicit):
    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    dataset = _encoded(_dataset(), implicit)
    data = part10.file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ts) + dataset
    fast = ingest.read_meta(data, ts, None, dataset=dataset)
    assert part10.header_elements(dataset, ts) is not None
    assert fast == ingest.read_meta(data, ts, None)
    assert fast.patient_name == "M\u00fcller^J\u00fcrgen" and fast.instance_number == 12


def test_what_the_raw_reader_declines_goes_to_pydicom():
    ds = _dataset()
    seq_item = Dataset()
    seq_item.ReferencedSOPInstanceUID = "1.2.9"
    ds.ReferencedImageSequence = [seq_item]  # (0008,1140), before the last tag wanted
    ts = "1.2.840.10008.1.2.1"
    meta = part10.file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ts)
    defined = _encoded(ds, False)
    assert part10.header_elements(defined, ts) is not None  # a defined-length sequence is skipped
    assert ingest.read_meta(meta + defined, ts, None, dataset=defined) == ingest.read_meta(meta + defined, ts, None)
    ds["ReferencedImageSequence"].is_undefined_length = True
    undefined = _encoded(ds, False)
    assert undefined != defined
    assert part10.header_elements(undefined, ts) is None  # declined: pydicom reads it, same result
    assert ingest.read_meta(meta + undefined, ts, None, dataset=undefined) == ingest.read_meta(meta + defined, ts, None)
    assert part10.header_elements(defined, "1.2.840.10008.1.2.2") is None  # big endian
    assert part10.header_elements(defined, "1.2.840.10008.1.2.1.99") is None  # deflated
    cut = defined[:defined.find(b"\x20\x00\x13\x00") + 5]
    assert part10.header_elements(cut, ts) is None  # truncated
    assert part10.header_elements(b"\x02\x00\x10\x00UI\x02\x001\x00" + defined, ts) is None  # group 0002
    swapped = b"\x08\x00\x18\x00UI\x04\x001.2\x00" + b"\x08\x00\x16\x00UI\x04\x001.2\x00"
    assert part10.header_elements(swapped, ts) is None  # tags out of order
    assert part10.header_elements(swapped[12:] + swapped[:12], ts) is not None
    garbage = b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 10
    assert part10.header_elements(garbage, ts) is None
    with pytest.raises(ingest.Refused):
        ingest.read_meta(part10.file_meta("1.2", "1.3", ts) + garbage, ts, None, dataset=garbage)


@pytest.mark.parametrize("uids", [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd, odd, odd lengths
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.55", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.88.34", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.90"),
])
def test_file_meta_is_byte_for_byte_pynetdicoms(uids):
    sop_class, sop_instance, ts = uids
    theirs = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts))
    assert part10.file_meta(sop_class, sop_instance, ts) == theirs
    with pytest.raises(UnicodeEncodeError):
        part10.file_meta(sop_class, "1.2.\u00e9", ts)


@pytest.mark.parametrize("attr,value", [
    ("InstanceNumber", "80.0"), ("InstanceNumber", " 7 "), ("SeriesNumber", "1\\2"), ("PatientName", "Doe^John=Ideo^Gram"),
    ("PatientName", "Doe^John "), ("StudyDescription", "A \\B "), ("Modality", ""), ("AccessionNumber", " X1 "),
    ("SpecificCharacterSet", ""), ("SOPInstanceUID", "1.2.3.4.5\x00"),
])
@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_odd_values_decode_as_pydicom_decodes_them(attr, value, implicit):
    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    ds = _dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Doe^John"
    ds.PatientID = "P1"
    ds.StudyDescription = "Thorax"
    setattr(ds, attr, value)
    dataset = _encoded(ds, implicit)
    data = part10.file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ts) + dataset
    assert _meta(data, ts, dataset) == _meta(data, ts, None)


@pytest.mark.parametrize("sop_class,sop_instance,status,msg_id", [
    ("1.2.840.10008.5.1.4.1.1.2", "1.3.6.1.4.1.14519.5.2.1.6279.6001.143451261327128179989900675595", 0x0000, 1),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3", 0xA700, 65535),
    ("1.2.840.10008.5.1.4.1.1.88.34", "2.25.12", 0xC000, 7),
])
def test_store_response_is_byte_for_byte_pynetdicoms(sop_class, sop_instance, status, msg_id):
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node import store_rsp

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = msg.encode_msg(1, 16384)
    assert pdata.presentation_data_value_list == [(1, b"\x03" + store_rsp.encode(rsp))]
    rsp.ErrorComment = "too large"
    assert store_rsp.encode(rsp) is None  # pynetdicom encodes anything but the plain response
