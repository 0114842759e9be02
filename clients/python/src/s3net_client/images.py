"""Turning what a caller has — a file, encoded bytes or a numpy array — into the bytes the
service decodes.

Files and bytes are sent untouched: the server reads the format from the bytes (PNG, JPEG,
BMP, TIFF, DICOM), so a DICOM keeps its rescale and window tags. Arrays are written as PNG
without loss: uint8 as 8-bit, uint16 as 16-bit, so the server's windowing sees the original
values. Other integer arrays (a CT slice in Hounsfield units as int16, int32, uint32; int64 and
uint64 when their values fit 32 bits) go as a grey TIFF in their own units, which the server
windows like a DICOM's values (a ``window`` in those units, else its automatic one). Floats in
[0, 1] are taken as intensities (the server's own working range) and written as 16-bit PNG;
grey floats beyond it are values in their own units (HU after a DICOM rescale) and go as a
float32 TIFF for the server's automatic window, like an int16 slice. With a ``window``, floats
are windowed here first.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types by channel count: grey, grey+alpha, RGB, RGBA.
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def prepare(image: Any, options: Dict[str, Any]) -> Tuple[bytes, Optional[str], Dict[str, Any]]:
    """The encoded image, the file's stem (None unless a path was given) and the options to
    send (a float array's window is applied here, so it is not sent)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.read_bytes(), path.stem, options
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), None, options
    if isinstance(image, np.ndarray) or hasattr(image, "__array_interface__"):
        array = np.asarray(image)
        window = options.get("window")
        if window is not None and array.dtype.kind == "f":
            from ._convert import window_tuple

            array = apply_window(array, *window_tuple(window))
            options = {k: v for k, v in options.items() if k != "window"}
        if array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.uint16):
            return encode_tiff(array), None, options
        grey = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
        if array.dtype.kind == "f" and array.size and grey:
            if not np.isfinite(array).all():
                raise ValueError("the float array holds NaN or infinite values")
            if float(array.min()) < 0.0 or float(array.max()) > 1.0:
                # Not intensities in [0, 1]: values in their own units (HU after a rescale),
                # windowed by the server like an int16 slice. (Colour floats must be in
                # [0, 1]: encode_png says so.)
                return encode_tiff(array), None, options
        return encode_png(array), None, options
    raise TypeError(
        f"cannot segment a {type(image).__name__}: pass a file path, encoded image bytes "
        "or a numpy array"
    )


def apply_window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """Maps ``center ± width/2`` linearly onto [0, 1], clipping outside (as the server does)."""
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    a = np.asarray(array, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("the float array holds NaN or infinite values")
    return np.clip((a - (center - width / 2.0)) / width, 0.0, 1.0)


def encode_png(array: np.ndarray) -> bytes:
    """A lossless PNG of an H×W, H×W×1, H×W×2 (grey+alpha), H×W×3 (RGB) or H×W×4 (RGBA)
    array: uint8 → 8-bit, uint16 → 16-bit, float in [0, 1] → 16-bit."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in _COLOUR_TYPE):
        raise ValueError(
            f"unsupported array shape {a.shape}: expected H×W (grey) or H×W×C with C = 3 "
            "(RGB), 4 (RGBA) or 2 (grey+alpha)"
        )
    height, width = a.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"the array is empty (shape {a.shape})")
    channels = 1 if a.ndim == 2 else a.shape[2]

    if a.dtype == np.uint8:
        depth, samples = 8, a
    elif a.dtype == np.uint16:
        depth, samples = 16, a.astype(">u2", copy=False)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("the float array holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float arrays must hold intensities in [0, 1] (this one spans {lo:g}..{hi:g}); "
                "pass window=(center, width) to map native units such as HU, or scale it"
            )
        depth, samples = 16, np.rint(a.astype(np.float64) * 65535.0).astype(">u2")
    else:
        raise ValueError(
            f"unsupported array dtype {a.dtype}: pass uint8, uint16, another integer type in "
            "its own units (e.g. CT in HU as int16), or float in [0, 1] (or with a window)"
        )

    # Each row: filter byte 0 (none), then the row's samples, big-endian for 16-bit.
    row_bytes = width * channels * depth // 8
    rows = np.zeros((height, 1 + row_bytes), dtype=np.uint8)
    rows[:, 1:] = np.ascontiguousarray(samples).view(np.uint8).reshape(height, row_bytes)
    header = struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


# TIFF field types.
_SHORT, _LONG = 3, 4


def encode_tiff(array: np.ndarray) -> bytes:
    """A single-page grey TIFF (Deflate, strips of about 1 MiB) of an H×W or H×W×1 array in
    its own units: int8, int16, int32, uint32 as they are (uint8 and uint16 too, though
    ``encode_png`` is the usual way for them); int64 and uint64 as int32 and uint32 when every
    value fits; floats as float32 (lossless for float32, 24 significant bits for float64). The
    server reads the values as they are (``SampleFormat``)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype.kind not in "iuf":
        raise ValueError(f"encode_tiff takes integer or float arrays, not {a.dtype}")
    if a.ndim != 2:
        raise ValueError(
            f"unsupported array shape {a.shape} for {a.dtype}: arrays in their own units "
            "(e.g. CT in HU) must be H×W grey"
        )
    if a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    height, width = a.shape
    if height == 0 or width == 0:
        raise ValueError(f"the array is empty (shape {a.shape})")
    if a.dtype.itemsize == 8:
        narrow = np.dtype(np.int32 if a.dtype.kind == "i" else np.uint32)
        info = np.iinfo(narrow)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"the {a.dtype} array spans {lo}..{hi}, beyond {narrow}: scale it or pass a "
                "narrower type"
            )
        a = a.astype(narrow)
    raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    row_bytes = width * a.dtype.itemsize
    rows_per_strip = max(1, (1 << 20) // row_bytes)
    strips = [
        zlib.compress(raw[r * row_bytes : (r + rows_per_strip) * row_bytes], 6)
        for r in range(0, height, rows_per_strip)
    ]
    # Layout: header, the strips, the strips' offsets and byte counts (when more than one),
    # then the one image file directory.
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    offsets = []
    for strip in strips:
        offsets.append(len(out))
        out += strip
        if len(out) % 2:
            out += b"\0"

    def long_array(values: list) -> Tuple[int, int]:
        """(count, value or offset) of a LONG field."""
        if len(values) == 1:
            return 1, values[0]
        at = len(out)
        out.extend(struct.pack(f"<{len(values)}I", *values))
        return len(values), at

    n_offsets, offsets_at = long_array(offsets)
    _, counts_at = long_array([len(s) for s in strips])
    entries = [
        (256, _LONG, 1, width),
        (257, _LONG, 1, height),
        (258, _SHORT, 1, a.dtype.itemsize * 8),  # BitsPerSample
        (259, _SHORT, 1, 8),  # Compression: Deflate
        (262, _SHORT, 1, 1),  # PhotometricInterpretation: BlackIsZero
        (273, _LONG, n_offsets, offsets_at),  # StripOffsets
        (277, _SHORT, 1, 1),  # SamplesPerPixel
        (278, _LONG, 1, rows_per_strip),
        (279, _LONG, n_offsets, counts_at),  # StripByteCounts
        (339, _SHORT, 1, {"u": 1, "i": 2, "f": 3}[a.dtype.kind]),  # SampleFormat
    ]
    ifd_at = len(out)
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == _SHORT else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += struct.pack("<I", 0)  # no next page
    out[4:8] = struct.pack("<I", ifd_at)
    return bytes(out)
