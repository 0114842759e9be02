"""Writes the test files of tests/data/dicom for how images are displayed (VOI LUTs, YBR_FULL_422)
and what pydicom shows of them, which the tests compare our decoder and windowing
(crates/imaging/src/dicom.rs, window.rs) with:

    pip install pydicom numpy pillow
    python tools/make_dicom_display.py tests/data/dicom

A 96×96 12-bit digital X-ray (DX, MONOCHROME2, stored 0..4095: a ramp, two disks and a fixed
noise), three times:

DX_voi_lut.dcm: a VOI LUT Sequence and no Window Center/Width. The table maps 3000 values from
500 by a square-root curve, and declares 16 output bits for 12-bit entries (as many X-ray files
do); values outside 500..3499 take its ends.
DX_voi_lut_mono1.dcm: the same table on MONOCHROME1 data (the stored values are the first
file's turned around, 4095 - v, and the table is laid over them the same way), so its greys are
one minus what pydicom's table gives.
DX_sigmoid.dcm: Window Center 2000, Width 1500 and VOI LUT Function SIGMOID.

Each reference is pydicom 3's `apply_voi_lut` of the stored values, stretched to 0..1 as our
decoder documents it (a table over its own smallest and largest entry; a sigmoid over
0..2^Bits Stored - 1, the range pydicom gives it), inverted for MONOCHROME1, written as a
16-bit PNG (*.voi.png).

SC_ybr_full_422_uncompressed.dcm (pydicom's test file, already here: 100×100, 8-bit,
uncompressed YBR_FULL_422): its RGB as pydicom 3's `pixel_array` gives it, as an 8-bit PNG
(*.pydicom.png).

US_segmented_palette.dcm: a 96×96 8-bit PALETTE COLOR ultrasound image whose three 256-entry
16-bit tables are segmented (PS3.3 C.7.9.2): red a discrete run then a linear ramp, green
linear segments with an indirect one copying two earlier segments, blue discrete values and a
flat linear run. Its reference is pydicom 3's `apply_color_lut`, high bytes, as an 8-bit RGB
PNG (*.pydicom.png).
"""
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SIDE = 96
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def stored() -> np.ndarray:
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    v = 300 + 3400 * x / (SIDE - 1)
    v[(x - 30) ** 2 + (y - 40) ** 2 < 15**2] = 3900
    v[(x - 65) ** 2 + (y - 60) ** 2 < 12**2] = 150
    v += np.random.default_rng(7).normal(0, 60, v.shape)
    return np.clip(np.round(v), 0, 4095).astype(np.uint16)


def dataset(pixels: np.ndarray, photometric: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX
    uid = generate_uid(entropy_srcs=["s3net voi test", photometric, str(pixels.sum())])
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = DX, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["s3net voi study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["s3net voi series", photometric])
    ds.Modality = "DX"
    ds.PatientName = "VOI^Test"
    ds.PatientID = "VOI-1"
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def with_table(ds: Dataset) -> Dataset:
    first, entries = 500, 3000
    curve = np.round(4095 * np.sqrt(np.arange(entries) / (entries - 1))).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, first, 16]
    item.LUTExplanation = "square root"
    item.LUTData = curve.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    return ds


def save(ds: Dataset, path: Path, grey: np.ndarray) -> None:
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert (back.pixel_array == np.frombuffer(ds.PixelData, np.uint16).reshape(SIDE, SIDE)).all()
    Image.fromarray(np.round(np.clip(grey, 0, 1) * 65535).astype(np.uint16)).save(path.with_suffix(".voi.png"))


def segmented_palette(out: Path) -> None:
    indices = np.add.outer(np.arange(SIDE), np.arange(SIDE)) * 255 // (2 * SIDE - 2)
    ds = dataset(indices.astype(np.uint8), "PALETTE COLOR")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.Modality = "US"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = indices.astype(np.uint8).tobytes()
    red = [0, 3, 0, 9000, 18000] + [1, 253, 65535]
    # One value; linear to 40000 over 49, back to 10000 over 50; those two linear segments
    # again (indirect: 2 segments from index 3 of the data); then flat.
    green = [0, 1, 500] + [1, 49, 40000] + [1, 50, 10000] + [2, 2, 3, 0] + [1, 57, 10000]
    blue = [0, 6, 65535, 60000, 50000, 40000, 30000, 20000] + [1, 250, 20000]
    for colour, segments in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", np.asarray(segments, np.uint16).tobytes())
        ds[f"Segmented{colour}PaletteColorLookupTableData"].VR = "OW"
    path = out / "US_segmented_palette.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    rgb = apply_color_lut(back.pixel_array, back)
    assert rgb.shape == (SIDE, SIDE, 3) and rgb.dtype == np.uint16, (rgb.shape, rgb.dtype)
    for c, segments in enumerate((red, green, blue)):
        assert len(np.unique(rgb[..., c])) > 20 or c == 2, c
    Image.fromarray((rgb >> 8).astype(np.uint8)).save(path.with_suffix(".pydicom.png"))


def main(out: Path) -> None:
    v = stored()

    ds = with_table(dataset(v, "MONOCHROME2"))
    table = np.asarray(ds.VOILUTSequence[0].LUTData, np.float64)
    lut = apply_voi_lut(v, ds).astype(np.float64)
    grey = (lut - table.min()) / (table.max() - table.min())
    save(ds, out / "DX_voi_lut.dcm", grey)

    # MONOCHROME1: the same image stored inverted; the table is over the stored values, and
    # the grey is inverted after it (PS3.3 C.7.6.3.1.2).
    turned = (4095 - v).astype(np.uint16)
    ds = with_table(dataset(turned, "MONOCHROME1"))
    lut = apply_voi_lut(turned, ds).astype(np.float64)
    grey = 1 - (lut - table.min()) / (table.max() - table.min())
    save(ds, out / "DX_voi_lut_mono1.dcm", grey)

    ds = dataset(v, "MONOCHROME2")
    ds.WindowCenter, ds.WindowWidth = 2000, 1500
    ds.VOILUTFunction = "SIGMOID"
    grey = apply_voi_lut(v, ds).astype(np.float64) / (2**12 - 1)
    save(ds, out / "DX_sigmoid.dcm", grey)

    ybr = out / "SC_ybr_full_422_uncompressed.dcm"
    rgb = pydicom.dcmread(ybr).pixel_array
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8, (rgb.shape, rgb.dtype)
    Image.fromarray(rgb).save(ybr.with_suffix(".pydicom.png"))

    segmented_palette(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
