"""DICOM JSON (PS3.18 Annex F) for the attributes the node indexes, and attribute names.

An attribute is named in a query by keyword (``PatientID``) or by tag (``00100020``); both map to
the tag's 8-digit upper-case hex form used as the key in DICOM JSON.
"""
from __future__ import annotations

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword


def tag_key(name: str) -> str | None:
    """``"PatientID"`` or ``"00100020"`` -> ``"00100020"``; None when neither."""
    name = name.strip()
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return name.upper()
    tag = tag_for_keyword(name)
    return None if tag is None else f"{tag:08X}"


def keyword(key: str) -> str:
    """The keyword of an 8-digit tag key (the key itself for a private or unknown tag)."""
    return keyword_for_tag(int(key, 16)) or key


def element(key: str, value) -> dict:  # noqa: ANN001
    """One DICOM JSON element for ``value`` (None or "" is present without a Value).

    Strings of multi-valued attributes are split at backslashes; PN values become
    ``{"Alphabetic": ...}``; IS/US/UL values are numbers.
    """
    try:
        vr = dictionary_VR(int(key, 16))
    except KeyError:
        vr = "UN"
    out: dict = {"vr": vr}
    if value is None or value == "":
        return out
    if vr == "PN":
        out["Value"] = [{"Alphabetic": v} for v in str(value).split("\\")]
    elif vr in ("IS", "US", "UL", "SL", "SS", "DS", "FD", "FL"):
        out["Value"] = [value] if isinstance(value, (int, float)) else [float(v) if vr in ("DS", "FD", "FL") else int(v)
                                                                          for v in str(value).split("\\") if v]
    elif vr == "UR" or vr == "UT" or vr == "LT" or vr == "ST":
        out["Value"] = [str(value)]
    else:
        out["Value"] = [v for v in str(value).split("\\")]
    return out


def dataset(values: dict[str, object]) -> dict:
    """A DICOM JSON object from ``{keyword or tag key: value}``, keys in tag order."""
    pairs = [(tag_key(k) or k, v) for k, v in values.items()]
    return {k: element(k, v) for k, v in sorted(pairs)}
