"""Writes the compressed DICOM test files of tests/data/dicom from the uncompressed ones there,
with GDCM (a toolkit PACS software uses; `pip install python-gdcm pydicom numpy`):

    python tools/make_dicom_codecs.py tests/data/dicom

CT_small (16-bit signed CT) as JPEG Lossless SV1, RLE Lossless, JPEG 2000 lossless and lossy,
and JPEG-LS (which s3net refuses); SC_rgb (8-bit colour, YBR_FULL) as RLE, JPEG Lossless and
JPEG 2000 (GDCM writes its samples as they are: YBR_FULL), and as RGB samples in JPEG 2000. The lossless ones must decode to exactly the samples of their source.
"""
import sys
from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

TS = gdcm.TransferSyntax


def transcode(src: Path, dst: Path, ts, lossy: bool = False) -> None:
    r = gdcm.ImageReader()
    r.SetFileName(str(src))
    assert r.Read(), src
    c = gdcm.ImageChangeTransferSyntax()
    c.SetTransferSyntax(TS(ts))
    if lossy:
        codec = gdcm.JPEG2000Codec()
        codec.SetRate(0, 20.0)  # 20:1, irreversible wavelet
        codec.SetReversible(False)
        c.SetUserCodec(codec)
    c.SetInput(r.GetImage())
    assert c.Change(), (src, ts)
    w = gdcm.ImageWriter()
    w.SetFileName(str(dst))
    w.SetFile(r.GetFile())
    w.SetImage(c.GetOutput())
    assert w.Write(), dst
    ds = pydicom.dcmread(dst)
    print(f"{dst.name}: {ds.file_meta.TransferSyntaxUID} {ds.PhotometricInterpretation}, {dst.stat().st_size} bytes")


def main(d: Path) -> None:
    ct, sc = d / "CT_small.dcm", d / "SC_rgb_jpeg_dcmtk.dcm"
    transcode(ct, d / "CT_small_jpeg_lossless.dcm", TS.JPEGLosslessProcess14_1)
    transcode(ct, d / "CT_small_rle.dcm", TS.RLELossless)
    transcode(ct, d / "CT_small_j2k.dcm", TS.JPEG2000Lossless)
    transcode(ct, d / "CT_small_j2k_lossy.dcm", TS.JPEG2000, lossy=True)
    transcode(ct, d / "CT_small_jpegls.dcm", TS.JPEGLSLossless)
    transcode(sc, d / "SC_rgb_rle.dcm", TS.RLELossless)
    transcode(sc, d / "SC_rgb_jpeg_lossless.dcm", TS.JPEGLosslessProcess14_1)
    transcode(sc, d / "SC_rgb_j2k.dcm", TS.JPEG2000Lossless)
    # The colour image as plain RGB samples first.
    ds = pydicom.dcmread(sc)
    rgb = ds.pixel_array  # pydicom converts YBR_FULL to RGB
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    tmp = d / "_sc_rgb_plain.dcm"
    ds.save_as(tmp, enforce_file_format=True)
    try:
        transcode(tmp, d / "SC_rgb_j2k_rgb.dcm", TS.JPEG2000Lossless)
    finally:
        tmp.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
