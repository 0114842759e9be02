"""Writes the JPEG XL test files of tests/data/dicom (DICOM's JPEG XL transfer syntaxes, 2024)
and the reference decodes the tests compare our decoder (crates/imaging/src/dicom.rs, through
jxl-oxide) with:

    pip install pydicom numpy imagecodecs pillow
    python tools/make_dicom_jpegxl.py tests/data/dicom

Each frame is compressed by libjxl (imagecodecs.jpegxl_encode) into one fragment, with a Basic
Offset Table, and wrapped by pydicom:

CT_small_jxl.dcm: CT_small's samples (all within 12 bits) as a 12-bit image of two frames, the
slice and the slice upside down, JPEG XL Lossless (1.2.840.10008.1.2.4.110): the decode must
give exactly its samples.
CT_small_jxl_lossy.dcm: the slice, JPEG XL (1.2.840.10008.1.2.4.112) at distance 1.0 (lossy);
libjxl's own decode of it is written as a 16-bit PNG next to it (*.libjxl.png).
SC_rgb_jxl.dcm: SC_rgb_rle's RGB image (8-bit), JPEG XL Lossless: exactly its samples.
"""
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from PIL import Image
from pydicom._uid_dict import UID_dictionary
from pydicom.encaps import encapsulate, generate_frames

LOSSLESS = "1.2.840.10008.1.2.4.110"
LOSSY = "1.2.840.10008.1.2.4.112"


def wrap(src: pydicom.Dataset, frames: list, ts: str, lossy: bool) -> pydicom.Dataset:
    ds = src.copy()
    ds.file_meta.TransferSyntaxUID = ts
    ds.NumberOfFrames = len(frames)
    if lossy:
        ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


def save(ds: pydicom.Dataset, path: Path) -> None:
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)


# pydicom 3.0 does not know JPEG XL's transfer syntaxes (encapsulated, explicit VR little
# endian): taught here.
for uid, name in ((LOSSLESS, "JPEG XL Lossless"), (LOSSY, "JPEG XL")):
    UID_dictionary.setdefault(uid, (name, "Transfer Syntax", "", "", name.replace(" ", "")))


def main(out: Path) -> None:
    src = pydicom.dcmread(out / "CT_small.dcm")
    stored = src.pixel_array.astype(np.int32)
    assert stored.min() >= 0 and stored.max() < 4096, (stored.min(), stored.max())
    ct = src.copy()
    ct.BitsStored, ct.HighBit, ct.PixelRepresentation = 12, 11, 0
    slices = [stored.astype(np.uint16), stored[::-1].astype(np.uint16)]

    frames = [imagecodecs.jpegxl_encode(s, lossless=True, bitspersample=12) for s in slices]
    for f, s in zip(frames, slices):
        assert (imagecodecs.jpegxl_decode(f) == s).all()
    save(wrap(ct, frames, LOSSLESS, False), out / "CT_small_jxl.dcm")

    lossy = imagecodecs.jpegxl_encode(slices[0], distance=1.0, bitspersample=12)
    path = out / "CT_small_jxl_lossy.dcm"
    save(wrap(ct, [lossy], LOSSY, True), path)
    back = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    decoded = imagecodecs.jpegxl_decode(back)
    assert decoded.dtype == np.uint16 and decoded.shape == slices[0].shape, (decoded.dtype, decoded.shape)
    Image.fromarray(decoded).save(path.with_suffix(".libjxl.png"))

    rgb = pydicom.dcmread(out / "SC_rgb_rle.dcm")
    pixels = rgb.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3, (pixels.dtype, pixels.shape)
    sc = rgb.copy()
    sc.PhotometricInterpretation = "RGB"
    sc.PlanarConfiguration = 0
    frame = imagecodecs.jpegxl_encode(pixels, lossless=True)
    assert (imagecodecs.jpegxl_decode(frame) == pixels).all()
    save(wrap(sc, [frame], LOSSLESS, False), out / "SC_rgb_jxl.dcm")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
