"""A folder of real-world DICOM oddities: every file pydicom and pydicom-data ship,
unusual but valid files made from them, and deliberately damaged copies.

``build_zoo(folder)`` writes it and returns what each made file is expected to be
(``MADE``), so a test can check both that nothing escapes and that each file gets
the right outcome.
"""

from __future__ import annotations

import copy
import shutil
import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pack_bits
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

#: Folders of shipped test files: pydicom's own, and the pydicom-data package's.
SHIPPED = (Path(pydicom.data.__file__).parent / "test_files",)
try:  # pydicom-data (a test dependency) installs the files pydicom would download
    import data_store

    SHIPPED += (Path(data_store.__file__).parent / "data",)
except ImportError:  # pragma: no cover - the test extra installs it
    pass

#: name -> expected outcome of each made file: "series" (decodes into a usable series)
#: or the skip reason's value, with a phrase its detail must contain.
MADE: dict[str, tuple[str, str]] = {
    "float_parametric_map.dcm": ("series", ""),
    "double_float_parametric_map.dcm": ("series", ""),
    "one_bit_native.dcm": ("series", ""),
    "instance_number_1A.dcm": ("series", ""),
    "deflated.dcm": ("series", ""),
    "deflated_stream_damaged.dcm": ("truncated pixel data", "deflated data set is damaged"),
    "one_bit_rle.dcm": ("unsupported transfer syntax", "1-bit RLE"),
    "private_transfer_syntax.dcm": ("unsupported transfer syntax", "1.2.826.0.1.3680043.9.7"),
    "malformed_transfer_syntax.dcm": ("unsupported transfer syntax", "malformed"),
    "rescale_slope_abc.dcm": ("missing or invalid image attributes", "RescaleSlope is 'abc'"),
    "rows_as_text.dcm": ("missing or invalid image attributes", "Rows"),
    "j2k_garbage.dcm": ("pixel decode failed", ""),
    "truncated_half.dcm": ("truncated pixel data", ""),
    "truncated_header.dcm": ("unreadable header", ""),
    "zeroed_header.dcm": ("not DICOM", ""),
    "random_with_preamble.dcm": ("unreadable header", ""),
    "empty.dcm": ("not DICOM", ""),
}


def shipped_files() -> list[Path]:
    """Every file pydicom and pydicom-data ship (never the ones pydicom would download)."""
    return sorted(p for root in SHIPPED for p in root.rglob("*") if p.is_file())


def build_zoo(folder: Path, *, seed: int = 0) -> list[Path]:
    """Write the zoo under ``folder``; returns every file written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for root in SHIPPED:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            target = folder / root.parent.name / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(target)
    made = folder / "made"
    made.mkdir(exist_ok=True)
    for name, data in _made_files(np.random.default_rng(seed)).items():
        (made / name).write_bytes(data)
        written.append(made / name)
    assert set(MADE) == {p.name for p in made.iterdir()}
    return written


def _made_files(rng: np.random.Generator) -> dict[str, bytes]:
    ct_path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    mr_path = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    ct = pydicom.dcmread(ct_path)
    out: dict[str, bytes] = {}

    pm = _fresh(ct)
    del pm.PixelData
    for keyword in (
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        delattr(pm, keyword)
    values = rng.random((int(pm.Rows), int(pm.Columns)))
    pm.BitsAllocated = 32
    pm.FloatPixelData = values.astype("<f4").tobytes()
    out["float_parametric_map.dcm"] = _bytes(pm)
    del pm.FloatPixelData
    pm = _fresh(pm)
    pm.BitsAllocated = 64
    pm.DoubleFloatPixelData = values.astype("<f8").tobytes()
    out["double_float_parametric_map.dcm"] = _bytes(pm)

    one_bit = _fresh(ct)
    one_bit.BitsAllocated, one_bit.BitsStored, one_bit.HighBit = 1, 1, 0
    one_bit.PixelRepresentation = 0
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        delattr(one_bit, keyword)
    one_bit.PixelData = pack_bits(rng.integers(0, 2, (int(ct.Rows), int(ct.Columns))))
    one_bit["PixelData"].VR = "OB"
    out["one_bit_native.dcm"] = _bytes(one_bit)
    rle = _fresh(one_bit)
    rle.file_meta.TransferSyntaxUID = RLELossless
    rle.PixelData = encapsulate([bytes(64) + b"\x7f" + bytes(127)])
    out["one_bit_rle.dcm"] = _bytes(rle)

    j2k = _fresh(ct)
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    j2k.PixelData = encapsulate([rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()])
    out["j2k_garbage.dcm"] = _bytes(j2k)

    private = _fresh(ct)  # a vendor's own transfer syntax UID:
    out["private_transfer_syntax.dcm"] = _bytes(private, meta_syntax="1.2.826.0.1.3680043.9.7.1")
    out["malformed_transfer_syntax.dcm"] = _bytes(_fresh(ct), meta_syntax="1.2.840.10008.1.2.1.x")
    # Malformed values as devices write them (pydicom refuses to): same-length patches.
    bad_is = _fresh(ct)
    bad_is.InstanceNumber = "91"
    out["instance_number_1A.dcm"] = _patch(_bytes(bad_is), b"\x20\x00\x13\x00IS", b"91", b"1A")
    bad_ds = _fresh(ct)
    bad_ds.RescaleSlope = "9.0"
    out["rescale_slope_abc.dcm"] = _patch(_bytes(bad_ds), b"\x28\x00\x53\x10DS", b"9.0 ", b"abc ")
    wrong_vr = _fresh(ct)
    wrong_vr.add_new(0x00280010, "LO", "sixty-four")  # Rows is US, here text
    out["rows_as_text.dcm"] = _bytes(wrong_vr)

    deflated = _fresh(pydicom.dcmread(mr_path))
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out["deflated.dcm"] = _bytes(deflated)
    damaged = bytearray(out["deflated.dcm"])
    damaged[-2000:-1000] = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    out["deflated_stream_damaged.dcm"] = bytes(damaged)

    whole = mr_path.read_bytes()
    out["truncated_half.dcm"] = whole[: len(whole) - 4096]
    out["truncated_header.dcm"] = whole[:400]
    zeroed = bytearray(whole)
    zeroed[:1024] = bytes(1024)
    out["zeroed_header.dcm"] = bytes(zeroed)
    out["random_with_preamble.dcm"] = (
        bytes(128) + b"DICM" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    )
    out["empty.dcm"] = b""
    return out


def _fresh(ds: Dataset) -> Dataset:
    """A copy that is a series of its own (new Series and SOP Instance UIDs)."""
    new = copy.deepcopy(ds)
    new.SeriesInstanceUID = generate_uid()
    new.SOPInstanceUID = generate_uid()
    new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    return new


def _bytes(ds: Dataset, *, meta_syntax: str | None = None) -> bytes:
    """The file's bytes; with ``meta_syntax``, the body is explicit VR little endian and
    the file meta names ``meta_syntax`` (a UID pydicom would refuse to write with)."""
    buffer = BytesIO()
    if meta_syntax is not None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    if meta_syntax is None:
        return buffer.getvalue()
    value = meta_syntax.encode()
    return _replace_meta_uid(buffer.getvalue(), value + b"\x00" * (len(value) % 2))


def _replace_meta_uid(data: bytes, new: bytes) -> bytes:
    """Set the file meta's TransferSyntaxUID to ``new``, fixing its length fields."""
    at = data.index(b"\x02\x00\x10\x00UI", 132)
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    patched = data[: at + 6] + struct.pack("<H", len(new)) + new + data[at + 8 + length :]
    group_at = data.index(b"\x02\x00\x00\x00UL", 132)
    group_len = struct.unpack("<I", data[group_at + 8 : group_at + 12])[0]
    fixed = struct.pack("<I", group_len + len(new) - length)
    return patched[: group_at + 8] + fixed + patched[group_at + 12 :]


def _patch(data: bytes, header: bytes, old: bytes, new: bytes) -> bytes:
    """Replace an explicit-VR element's value (``header``: tag and VR) by one as long."""
    at = data.index(header) + len(header) + 2
    assert data[at : at + len(old)] == old and len(old) == len(new)
    return data[:at] + new + data[at + len(old) :]
