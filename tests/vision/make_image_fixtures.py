#!/usr/bin/python3
"""make_image_fixtures.py -- writes the small PNGs test_image.c decodes (tests/vision/data/),
with vision_ref.write_png (zlib, no PIL). test_image.c computes the same pixel formulas.
  rgb.png   7 x 5 RGB:   r = 30x, g = 40y + 10, b = (11xy) % 256
  rgba.png  4 x 3 RGBA:  r = 60x, g = 200, b = 80y, a = {0, 90, 180, 255}[x]
  grey.png  5 x 4 grey:  v = 50x + y
Usage: /usr/bin/python3 tests/vision/make_image_fixtures.py
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
import vision_ref  # noqa: E402

out = os.path.join(HERE, "data")
os.makedirs(out, exist_ok=True)
y, x = np.mgrid[0:5, 0:7]
vision_ref.write_png(os.path.join(out, "rgb.png"), np.stack([30 * x, 40 * y + 10, (11 * x * y) % 256], -1))
y, x = np.mgrid[0:3, 0:4]
alpha = np.array([0, 90, 180, 255])[x]
vision_ref.write_png(os.path.join(out, "rgba.png"), np.stack([60 * x, 0 * x + 200, 80 * y, alpha], -1))
y, x = np.mgrid[0:4, 0:5]
vision_ref.write_png(os.path.join(out, "grey.png"), 50 * x + y)
