"""funmatch/images.py (numpy) against funmatch/data/preprocess.py (TensorFlow).

The predict path must give the model exactly the input funmatch-eval gives it;
the reference is the pipeline's own eval view and decoder.
"""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from funmatch import images
from funmatch.data import preprocess
from funmatch.errors import UserError

# (height, width, res, eval_crop, antialias, ratio): up- and downscaling, odd
# sizes, portrait and landscape, the default ratio and the paper's 160/128.
CASES = [
    (37, 53, 16, "resize_small_central", False, 1.143),
    (300, 211, 64, "resize_small_central", False, 1.25),
    (20, 20, 32, "resize_small_central", False, 1.143),
    (64, 48, 24, "resize_small_central", False, 1.0),
    (16, 16, 16, "resize", False, 1.143),
    (24, 31, 16, "resize", False, 1.0),
    (10, 13, 24, "resize", False, 1.0),
    (31, 50, 16, "resize", True, 1.0),
    (10, 13, 24, "resize", True, 1.0),
]


@pytest.mark.parametrize("height,width,res,crop,antialias,ratio", CASES)
def test_eval_view_matches_the_pipeline(height, width, res, crop, antialias, ratio):
  image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3),
                                                         dtype=np.uint8)
  spec = preprocess.Spec(eval_crop=crop, eval_resize_ratio=ratio,
                         resize_antialias=antialias)
  want = preprocess.eval_view(tf.constant(image), res, spec).numpy()
  got = images.Preprocessing(res, crop, ratio, antialias)(image)
  assert got.shape == want.shape == (res, res, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def _encoded(array, mode, fmt="PNG"):
  buffer = io.BytesIO()
  Image.fromarray(array).convert(mode).save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_png_decodes_as_tensorflow_does(tmp_path, mode):
  array = np.random.default_rng(1).integers(0, 256, (9, 14, 3), dtype=np.uint8)
  data = _encoded(array, mode)
  path = tmp_path / f"x_{mode}.png"
  path.write_bytes(data)
  want = preprocess.decode(tf.constant(data)).numpy()
  got = images.decode(str(path))
  assert got.dtype == np.uint8 and got.shape == want.shape == (9, 14, 3)
  np.testing.assert_array_equal(got, want)


def test_undecodable_file_is_named(tmp_path):
  path = tmp_path / "broken.png"
  path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  with pytest.raises(UserError, match="broken.png") as info:
    images.decode(str(path))
  assert "\n" not in str(info.value)
