"""segment() against the real server, for every kind of input the client accepts."""

from __future__ import annotations

import io
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from pyclient_support import DATA, FAST, SLOW, wait_until
from s3net_client import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    JobState,
    NotFound,
    S3NetError,
    SegmentationResult,
    Unavailable,
    encode_png,
    encode_tiff,
    events,
)

PH2 = DATA / "ph2" / "IMD002.png"
LUNG = DATA / "lung" / "ID_0000_Z_0142.png"


def check_result(r: SegmentationResult, height: int, width: int, iterations: int = 2) -> None:
    """The result is complete and self-consistent, at the input's own size."""
    assert (r.height, r.width) == (height, width)
    assert r.labels.shape == (height, width) and r.labels.dtype in (np.uint8, np.uint16)
    assert r.mask.shape == (height, width) and r.mask.dtype == np.bool_
    assert r.iterations == iterations
    # Stats describe the returned label map (labels_used is checked apart: see below).
    assert [c.label for c in r.clusters] == np.unique(r.labels).tolist()
    assert r.labels_used >= len(r.clusters)
    assert sum(c.pixel_count for c in r.clusters) == height * width
    for c in r.clusters:
        assert c.pixel_count == int((r.labels == c.label).sum())
        assert 0.0 <= c.mean_intensity <= 1.0
        assert c.bbox.x + c.bbox.width <= width and c.bbox.y + c.bbox.height <= height
    assert r.mask.mean() == pytest.approx(r.foreground_fraction, abs=1e-6)
    assert np.isfinite([r.losses.total, r.losses.ce, r.losses.affine, r.losses.spatial]).all()
    assert r.timings.fit_seconds > 0 and r.timings.total_seconds >= r.timings.fit_seconds
    assert r.options.size == 64 and r.options.iterations == iterations and r.options.seed == 7
    assert r.options.all["size"] == 64
    assert r.device == "cpu" and r.job_id


def test_labels_used_matches_the_label_map(client: Client) -> None:
    r = client.segment(DATA / "dicom" / "CT_small.dcm", **FAST)
    assert r.labels_used == len(r.clusters) == int(r.labels.max()) + 1


def test_png_path(client: Client) -> None:
    with Image.open(PH2) as img:
        w, h = img.size
    check_result(client.segment(PH2, **FAST), h, w)
    # str paths work as well as Path objects
    check_result(client.segment(str(PH2), **FAST), h, w)


def test_bfloat16_precision(client: Client) -> None:
    with Image.open(PH2) as img:
        w, h = img.size
    r = client.segment(PH2, precision="bfloat16", **FAST)
    check_result(r, h, w)
    assert r.options.all["precision"] == "bfloat16"
    assert client.segment(PH2, **FAST).options.all["precision"] == "float32"
    with pytest.raises(InvalidArgument, match="unknown precision 'fp8'"):
        client.segment(PH2, precision="fp8", **FAST)


def test_offset_learning_rate(client: Client) -> None:
    r = client.segment(PH2, offset_lr=3000, **FAST)
    assert r.options.all["offset_lr"] == 3000.0
    assert client.segment(PH2, **FAST).options.all["offset_lr"] == 1.0
    for bad in (0, -1, 2e6, float("nan")):
        with pytest.raises(InvalidArgument, match=r"offset_lr must be in \(0, 1e6\]"):
            client.segment(PH2, offset_lr=bad, **FAST)
    with pytest.raises(ValueError, match="option offset_lr='fast' is invalid"):
        client.segment(PH2, offset_lr="fast", **FAST)


def test_segment_frames_yields_every_page_in_order(client: Client) -> None:
    """Frame 0's result says how many frames there are; the others follow in order, each the
    size of its own page; a failing frame is yielded with its error and the rest go on."""
    tif = DATA / "raster" / "two-pages.tif"
    got = [(f, r.frames, r.width, r.height) for f, r in client.segment_frames(tif, concurrency=2, **FAST)]
    assert got == [(0, 2, 96, 72), (1, 2, 64, 64)]
    assert [f for f, _ in client.segment_frames(PH2, **FAST)] == [0]
    # Frame 0's error is raised: how many frames there are is then unknown.
    with pytest.raises(InvalidArgument, match="window"):
        next(client.segment_frames(tif, window=(0, 0), **FAST))
    with pytest.raises(TypeError, match="no frame= option"):
        next(client.segment_frames(tif, frame=1, **FAST))


def test_segment_frames_yields_a_later_frames_error_and_goes_on(client: Client, monkeypatch) -> None:
    """A frame after the first that fails (here frame 1 of 3, made to fail UNAVAILABLE past its
    retries) is yielded with its error; frame 2 is still segmented."""
    volume = DATA / "dicom" / "CT_small_enhanced_3frames.dcm"
    real = client.segment

    def flaky(image: Any, **kw: Any) -> Any:
        if kw.get("frame") == 1:
            raise Unavailable("the server went away", code=grpc.StatusCode.UNAVAILABLE)
        return real(image, **kw)

    monkeypatch.setattr(client, "segment", flaky)
    got = list(client.segment_frames(volume, **FAST))
    assert [f for f, _ in got] == [0, 1, 2]
    assert isinstance(got[1][1], Unavailable)
    assert got[0][1].frames == 3 and got[2][1].frames == 3


def test_16bit_png_path(client: Client) -> None:
    with Image.open(LUNG) as img:
        assert img.mode.startswith("I")  # the sample really is 16-bit
        w, h = img.size
    check_result(client.segment(LUNG, **FAST), h, w)


def test_jpeg_and_tiff(client: Client, tmp_path) -> None:
    with Image.open(PH2) as img:
        rgb = img.convert("RGB")
    for name in ("IMD002.jpg", "IMD002.tif"):
        path = tmp_path / name
        rgb.save(path)
        check_result(client.segment(path, **FAST), rgb.height, rgb.width)


def test_exif_orientation_is_applied(client: Client, tmp_path) -> None:
    """A camera JPEG stored sideways with an Exif orientation is segmented as displayed: the
    result has the size Pillow's exif_transpose gives, and says which orientation it applied."""
    with Image.open(PH2) as img:
        small = img.convert("RGB").resize((120, 90))
    exif = small.getexif()
    exif[0x0112] = 6  # stored pixels are to be turned 90° clockwise
    path = tmp_path / "sideways.jpg"
    small.save(path, exif=exif)
    with Image.open(path) as stored:
        shown = ImageOps.exif_transpose(stored)
    assert shown.size == (90, 120)
    r = client.segment(path, **FAST)
    check_result(r, shown.height, shown.width)
    assert r.options.orientation == 6 and r.to_dict()["orientation"] == 6
    assert client.segment(PH2, **FAST).options.orientation == 1


def test_dicom(client: Client) -> None:
    r = client.segment(DATA / "dicom" / "CT_small.dcm", **FAST)
    check_result(r, 128, 128)
    # The file's Pixel Spacing, and the mask's area in mm² with it.
    assert r.pixel_spacing == (0.661468, 0.661468)
    area = int(r.mask.sum()) * 0.661468**2
    assert r.foreground_area_mm2 == pytest.approx(area, rel=1e-12)
    d = r.to_dict()
    assert d["pixel_spacing_mm"] == [0.661468, 0.661468]
    assert d["foreground_area_mm2"] == r.foreground_area_mm2
    # No spacing for a photograph.
    png = client.segment(PH2, **FAST)
    assert png.pixel_spacing is None and png.foreground_area_mm2 is None


def test_bytes(client: Client) -> None:
    data = PH2.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    check_result(client.segment(data, **FAST), h, w)
    check_result(client.segment(bytearray(data), **FAST), h, w)


def test_numpy_arrays(client: Client) -> None:
    with Image.open(PH2) as img:
        rgb = np.asarray(img.convert("RGB"))
        grey = np.asarray(img.convert("L"))
    h, w = grey.shape
    check_result(client.segment(rgb, **FAST), h, w)
    check_result(client.segment(grey, **FAST), h, w)
    check_result(client.segment(grey[:, :, None], **FAST), h, w)


def test_arrays_are_sent_losslessly(client: Client) -> None:
    """A uint16 array and the same values as floats in [0, 1] give the very fit the 16-bit
    file gives: nothing was lost on the way (the fit is deterministic for a seed on CPU)."""
    with Image.open(LUNG) as img:
        u16 = np.asarray(img).astype(np.uint16)
    h, w = u16.shape
    from_file = client.segment(LUNG, **FAST)
    from_u16 = client.segment(u16, **FAST)
    from_float = client.segment(u16 / 65535.0, **FAST)
    for r in (from_u16, from_float):
        check_result(r, h, w)
        np.testing.assert_array_equal(r.labels, from_file.labels)
        np.testing.assert_array_equal(r.mask, from_file.mask)


def test_float_array_with_window(client: Client) -> None:
    with Image.open(LUNG) as img:
        hu = np.asarray(img).astype(np.float32) - 1024.0  # the sample stores HU + 1024
    r = client.segment(hu, window=(-600.0, 1500.0), **FAST)
    check_result(r, *hu.shape)
    # The window was applied by the client, so the server saw plain [0, 1] intensities.
    assert r.options.window is None


def test_window_on_integer_images_goes_to_the_server(client: Client) -> None:
    r = client.segment(LUNG, window=(424.0, 1500.0), **FAST)
    assert (r.options.window.center, r.options.window.width) == (424.0, 1500.0)
    assert r.options.window_function == "LINEAR"


def test_a_dicom_files_own_window_function_is_applied_and_named(client: Client) -> None:
    """An X-ray's VOI LUT Sequence (its curve over 500..3499) and a sigmoid window are applied
    as the file says, and named; a window in the request is linear, whatever the file's."""
    table = client.segment(DATA / "dicom" / "DX_voi_lut.dcm", **FAST)
    assert table.options.window_function == "TABLE"
    assert (table.options.window.center, table.options.window.width) == (2000.0, 3000.0)
    sigmoid = client.segment(DATA / "dicom" / "DX_sigmoid.dcm", **FAST)
    assert sigmoid.options.window_function == "SIGMOID"
    assert (sigmoid.options.window.center, sigmoid.options.window.width) == (2000.0, 1500.0)
    asked = client.segment(DATA / "dicom" / "DX_sigmoid.dcm", window=(2000.0, 1500.0), **FAST)
    assert asked.options.window_function == "LINEAR"
    assert client.segment(PH2, **FAST).options.window_function == ""


def test_integer_arrays_go_in_their_own_units(client: Client) -> None:
    """A CT slice as int16 Hounsfield units (and as int32, int64, uint32, and as floats) is sent
    as a TIFF in those units: the server's automatic window moves with the values, so the fit is the very
    one of the 16-bit file (HU + 1024); a window is in HU and applied by the server."""
    with Image.open(LUNG) as img:
        u16 = np.asarray(img).astype(np.uint16)
    hu = u16.astype(np.int32) - 1024
    from_file = client.segment(LUNG, **FAST)
    arrays = (hu.astype(np.int16), hu, hu.astype(np.int64), u16.astype(np.uint32))
    # Floats beyond [0, 1] are values in their own units too (HU after a DICOM rescale).
    arrays += (hu.astype(np.float64), hu.astype(np.float32))
    for array in arrays:
        r = client.segment(array, **FAST)
        check_result(r, *hu.shape)
        np.testing.assert_array_equal(r.labels, from_file.labels, err_msg=str(array.dtype))
        np.testing.assert_array_equal(r.mask, from_file.mask, err_msg=str(array.dtype))
    in_hu = client.segment(hu.astype(np.int16), window=(-600.0, 1500.0), **FAST)
    assert (in_hu.options.window.center, in_hu.options.window.width) == (-600.0, 1500.0)
    shifted = client.segment(LUNG, window=(424.0, 1500.0), **FAST)
    np.testing.assert_array_equal(in_hu.labels, shifted.labels)


def test_encode_tiff_round_trips_through_pillow() -> None:
    """The client's TIFF writer, read back by Pillow: one strip and several (1 MiB each)."""
    rng = np.random.default_rng(3)
    for shape in ((37, 51), (1100, 600)):
        a = rng.integers(-1024, 3000, shape).astype(np.int16)
        with Image.open(io.BytesIO(encode_tiff(a))) as img:
            np.testing.assert_array_equal(np.asarray(img).astype(np.int32), a)


def test_unsupported_arrays_are_value_errors(client: Client) -> None:
    with pytest.raises(ValueError, match="dtype complex64"):
        client.segment(np.zeros((8, 8), np.complex64))
    with pytest.raises(ValueError, match="H×W grey"):
        client.segment(np.zeros((8, 8, 3), np.int16))
    with pytest.raises(ValueError, match="beyond int32"):
        client.segment(np.full((8, 8), 1 << 40))
    with pytest.raises(ValueError, match="shape"):
        client.segment(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        client.segment(np.zeros(8, np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_png(np.full((8, 8), 2.0))
    # Colour floats are intensities in [0, 1] (a photo as floats 0..255 must be scaled).
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        client.segment(np.full((8, 8, 3), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        client.segment(np.full((8, 8), np.nan))
    with pytest.raises(TypeError, match="numpy array"):
        client.segment(12345)
    with pytest.raises(TypeError, match="unknown option"):
        client.segment(PH2, iteration=3)
    with pytest.raises(ValueError, match="iterations"):
        client.segment(PH2, iterations=-1)


def test_chunked_upload(server, client: Client) -> None:
    single = client.segment(PH2, **FAST)
    forced = client.segment(PH2, upload=True, **FAST)
    # Above the threshold the client switches to SegmentUpload by itself.
    with Client(server.addr, upload_threshold=64 << 10, chunk_size=100_000) as small:
        automatic = small.segment(PH2, **FAST)
    for r in (forced, automatic):
        np.testing.assert_array_equal(r.labels, single.labels)
        assert r.clusters == single.clusters


def test_progress_callback(client: Client) -> None:
    seen = []
    r = client.segment(PH2, progress=seen.append, size=64, iterations=3, seed=7)
    kinds = [type(e) for e in seen]
    assert kinds[0] is events.Queued and kinds[1] is events.Started
    assert kinds[-1] is events.Completed and seen[-1].result is r
    steps = [e for e in seen if isinstance(e, events.Progress)]
    # progress_interval_ms = 0 in the test server: one event per step.
    assert [p.iteration for p in steps] == [1, 2, 3]
    assert all(p.max_iterations == 3 and p.labels > 0 for p in steps)
    assert {e.job_id for e in seen} == {r.job_id}


def test_progress_bar(client: Client, capsys) -> None:
    client.segment(PH2, progress=True, size=64, iterations=3, seed=7)
    err = capsys.readouterr().err
    assert "IMD002" in err and "3/3" in err


def test_errors_carry_code_and_message(client: Client) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.segment(b"")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in e.value.details
    assert str(e.value).startswith("INVALID_ARGUMENT: ")
    with pytest.raises(InvalidArgument, match="format"):
        client.segment(b"definitely not an image")
    with pytest.raises(InvalidArgument, match="size") as e:
        client.segment(PH2, size=5)
    assert isinstance(e.value, S3NetError)
    with pytest.raises(InvalidArgument, match="preset"):
        client.segment(PH2, preset="nonsense")
    with pytest.raises(NotFound) as e:
        client.get("no-such-job")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.details


def test_deadline_cancels_the_job(client: Client) -> None:
    seen = []
    with pytest.raises(DeadlineExceeded) as e:
        client.segment(PH2, progress=seen.append, timeout=2.0, **SLOW)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    job_id = seen[0].job_id
    job = wait_until(lambda: (j := client.get(job_id)).state.finished and j)
    assert job.state == JobState.CANCELLED
