"""Writes the 12-bit lossy JPEG (JPEG Extended, process 4) test files of tests/data/dicom and the
reference decodes the tests compare our decoder (crates/imaging/src/jpeg12.rs) with:

    pip install pydicom numpy imagecodecs pillow
    python tools/make_dicom_jpeg12.py tests/data/dicom

CT_small_jpeg12_2frames.dcm: CT_small's samples (all within 12 bits) as a 12-bit image of two
frames, the slice and the slice turned upside down, each compressed by libjpeg-turbo 3
(imagecodecs.jpeg8_encode, 12 bits, quality 90: IJG's codec, as PACS toolkits use it) into one
fragment, with a Basic Offset Table. (GDCM 3.2.6 wrote 16-bit precision for this data set.) JPEG-lossy.dcm: pydicom's own test file,
from another encoder, whose scan header says Se = 0 (libjpeg-turbo and GDCM decode it; IJG's
rule is that sequential scans ignore it); it is JPGExtended.dcm's image, whose header says 63. Each frame's reference decode is libjpeg-turbo 3's
(imagecodecs.jpeg8_decode), written as a 16-bit PNG next to the file (*.frameN.libjpeg.png).
"""
import os
import shutil
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGExtended12Bit


def references(path: Path) -> None:
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1))
    for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        decoded = imagecodecs.jpeg8_decode(frame)
        assert decoded.dtype == np.uint16 and decoded.shape == (ds.Rows, ds.Columns), decoded.shape
        Image.fromarray(decoded).save(path.with_suffix(f".frame{i}.libjpeg.png"))


def main(out: Path) -> None:
    src = pydicom.dcmread(out / "CT_small.dcm")
    stored = src.pixel_array.astype(np.int32)
    assert stored.min() >= 0 and stored.max() < 4096, (stored.min(), stored.max())
    ds = src.copy()
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.NumberOfFrames = 2
    ds.LossyImageCompression = "01"
    frames = [imagecodecs.jpeg8_encode(f.astype(np.uint16), level=90, bitspersample=12) for f in (stored, stored[::-1])]
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.save_as(out / "CT_small_jpeg12_2frames.dcm", enforce_file_format=True)
    references(out / "CT_small_jpeg12_2frames.dcm")
    # JPGExtended.dcm (pydicom's, already here) and JPEG-lossy.dcm are one image: the second's
    # scan header says Se = 0 where the first's says 63. One reference serves both.
    lossy = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files" / "JPEG-lossy.dcm"
    shutil.copy(lossy, out / "JPEG-lossy.dcm")
    references(out / "JPGExtended.dcm")
    same = [
        imagecodecs.jpeg8_decode(next(generate_frames(pydicom.dcmread(out / f).PixelData, number_of_frames=1)))
        for f in ("JPGExtended.dcm", "JPEG-lossy.dcm")
    ]
    assert (same[0] == same[1]).all()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
