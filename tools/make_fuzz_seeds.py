"""Writes fuzz/seeds: small raster images in the layouts the decoders branch on, so the
fuzzer (`make fuzz`, README "Fuzzing") starts from every PNG colour type, BMP depth, JPEG and
TIFF sample format without megabyte-sized inputs (tests/data's PH2 and lung PNGs are 0.4–0.7 MB;
libFuzzer mutates small inputs hundreds of times a second, large ones a few times):

    python tools/make_fuzz_seeds.py fuzz/seeds

Needs Pillow and numpy (the Python test venv has both). The DICOM and other raster files of
tests/data are seeds as they are (scripts/fuzz.sh copies them).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(__file__).resolve().parent.parent / "tests" / "data"
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rgb = Image.open(root / "ph2" / "IMD002.png").convert("RGB").resize((40, 30))
rgb.save(out / "small-rgb.png")
rgb.convert("L").save(out / "small-grey.png")
rgb.convert("P").save(out / "small-palette.png")
rgb.convert("LA").save(out / "small-greyalpha.png")
rgb.convert("RGBA").save(out / "small-rgba.png", optimize=True)
rgb.save(out / "small.bmp")
rgb.convert("L").save(out / "small-grey.bmp")
rgb.convert("P").save(out / "small-palette.bmp")
rgb.save(out / "small.jpg", quality=80)
rgb.convert("L").save(out / "small-grey.jpg")
rgb.save(out / "small-lzw.tif", compression="tiff_lzw")
rgb.convert("L").save(out / "small-packbits.tif", compression="packbits")
# The lung slice (HU + 1024) every 16th pixel: 16-bit PNG, signed 32-bit and float TIFF.
ct = np.array(Image.open(root / "lung" / "ID_0000_Z_0142.png"))[::16, ::16].astype(np.uint16)
Image.fromarray(ct).save(out / "small-16bit.png")
Image.fromarray(ct.astype(np.int32)).save(out / "small-i32.tif")
Image.fromarray(ct.astype(np.float32)).save(out / "small-f32.tif")
