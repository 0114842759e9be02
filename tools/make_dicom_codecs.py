"""Writes the compressed DICOM test files of tests/data/dicom from the uncompressed ones there,
with GDCM (a toolkit PACS software uses; `pip install python-gdcm pydicom numpy imagecodecs`),
High-Throughput JPEG 2000 with OpenJPH (imagecodecs), and an Enhanced CT with pydicom:

    python tools/make_dicom_codecs.py tests/data/dicom

CT_small (16-bit signed CT) as JPEG Lossless SV1, RLE Lossless, JPEG 2000 lossless and lossy,
JPEG-LS and High-Throughput JPEG 2000; SC_rgb (8-bit colour, YBR_FULL) as RLE, JPEG Lossless and
JPEG 2000 (GDCM writes its samples as they are: YBR_FULL), and as RGB samples in JPEG 2000.
The lossless ones must decode to exactly the samples of their source.
"""
import sys
from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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


def enhanced_ct(src: Path, dst: Path) -> None:
    """A three-frame Enhanced CT (pydicom), as modern scanners export: Rescale, Window and Pixel
    Spacing only in the functional groups. Frame k holds CT_small's pixels (every other one)
    stored with intercept (-1024, -1000, 0)[k], so every frame is the same image in HU; Pixel
    Spacing is shared, the rescale and the window are per frame."""
    ct = pydicom.dcmread(src)
    hu = ct.pixel_array[::2, ::2].astype(np.int32) + int(ct.RescaleIntercept)
    intercepts, windows = (-1024, -1000, 0), ((40, 400), (-600, 1500), (300, 1500))
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["s3net", "enhanced CT"])
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.NumberOfFrames = 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.75]
    measures.SliceThickness = 1.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for b, (c, w) in zip(intercepts, windows):
        t = Dataset()
        t.RescaleIntercept, t.RescaleSlope, t.RescaleType = b, 1, "HU"
        v = Dataset()
        v.WindowCenter, v.WindowWidth = c, w
        f = Dataset()
        f.PixelValueTransformationSequence = Sequence([t])
        f.FrameVOILUTSequence = Sequence([v])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([hu - b for b in intercepts]).astype(np.int16).tobytes()
    ds.save_as(dst, enforce_file_format=True)
    print(f"{dst.name}: Enhanced CT, 3 frames, {dst.stat().st_size} bytes")


def palette_crop(dst: Path) -> None:
    """pydicom's own PALETTE COLOR example (an ultrasound: 8-bit indices, 16-bit LUT entries),
    cut to the 200×120 pixels from row 0, column 140, where most of its colours are."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    crop = np.ascontiguousarray(ds.pixel_array[0:120, 140:340])
    ds.Rows, ds.Columns = crop.shape
    ds.PixelData = crop.tobytes()
    ds.save_as(dst, enforce_file_format=True)
    rgb = apply_color_lut(pydicom.dcmread(dst).pixel_array, ds)
    print(f"{dst.name}: PALETTE COLOR, {dst.stat().st_size} bytes; pydicom's RGB (16-bit) plane sums:",
          rgb.reshape(-1, 3).astype(np.int64).sum(0).tolist(), "of the high bytes:",
          (rgb >> 8).reshape(-1, 3).astype(np.int64).sum(0).tolist())


def htj2k(src: Path, dst: Path) -> None:
    """High-Throughput JPEG 2000, lossless, by OpenJPH (through imagecodecs; GDCM writes none)."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = pydicom.dcmread(src)
    stream = imagecodecs.htj2k_encode(ds.pixel_array, level=0)
    assert np.array_equal(imagecodecs.htj2k_decode(stream), ds.pixel_array)
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(dst, enforce_file_format=True)
    print(f"{dst.name}: {HTJ2KLossless}, {dst.stat().st_size} bytes")


def main(d: Path) -> None:
    ct, sc = d / "CT_small.dcm", d / "SC_rgb_jpeg_dcmtk.dcm"
    transcode(ct, d / "CT_small_jpeg_lossless.dcm", TS.JPEGLosslessProcess14_1)
    transcode(ct, d / "CT_small_rle.dcm", TS.RLELossless)
    transcode(ct, d / "CT_small_j2k.dcm", TS.JPEG2000Lossless)
    transcode(ct, d / "CT_small_j2k_lossy.dcm", TS.JPEG2000, lossy=True)
    transcode(ct, d / "CT_small_jpegls.dcm", TS.JPEGLSLossless)
    htj2k(ct, d / "CT_small_htj2k.dcm")
    transcode(sc, d / "SC_rgb_rle.dcm", TS.RLELossless)
    transcode(sc, d / "SC_rgb_jpeg_lossless.dcm", TS.JPEGLosslessProcess14_1)
    transcode(sc, d / "SC_rgb_j2k.dcm", TS.JPEG2000Lossless)
    enhanced_ct(ct, d / "CT_small_enhanced_3frames.dcm")
    palette_crop(d / "US_palette.dcm")
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
