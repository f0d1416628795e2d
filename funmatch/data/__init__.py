"""Input data: sources (digits, TFDS, image folders) -> tf.data -> jax.Arrays.

The only funmatch package that imports TensorFlow. TensorFlow is used on the
host CPU only; it must not grab the accelerators that JAX uses.
"""

import os

# Quieten TF's C++ start-up logging unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere.
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from funmatch.data.pipeline import EvalIterable
from funmatch.data.pipeline import make_eval_iterator
from funmatch.data.pipeline import make_train_iterator
from funmatch.data.source import DataSource
from funmatch.data.sources import open_source
