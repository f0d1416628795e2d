"""Weight files: reading/writing npz, safetensors and .pth safely."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from funmatch import models
from funmatch.errors import UserError
from funmatch.weights import files as formats
from funmatch.weights import layouts

MARKER = "executed.marker"


class Exploit:
  """Unpickling this creates a marker file: proof that code ran."""

  def __init__(self, directory):
    self.path = os.path.join(str(directory), MARKER)

  def __reduce__(self):
    return (open, (self.path, "w"))


def one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    call(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_npz_and_safetensors_round_trip_with_metadata(tmp_path):
  arrays = {"a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones(4, np.float32)}
  metadata = {"model": "bit", "options": {"depth": [1, 1, 1, 1]}}
  for path, write in ((tmp_path / "w.npz", formats.write_npz),
                      (tmp_path / "w.safetensors", formats.write_safetensors)):
    write(str(path), arrays, metadata)
    weights = formats.read(str(path))
    assert weights.metadata == metadata
    assert set(weights.arrays) == set(arrays)  # metadata is not an array
    for name, value in arrays.items():
      np.testing.assert_array_equal(weights.arrays[name], value)
    peeked = formats.peek(str(path))
    assert peeked.arrays is None and set(peeked.names) == set(arrays)
    assert peeked.metadata == metadata
  # No temporary files are left behind.
  assert sorted(os.listdir(tmp_path)) == ["w.npz", "w.safetensors"]
  # The npz metadata is a plain string array: readable without pickles.
  with np.load(tmp_path / "w.npz", allow_pickle=False) as f:
    assert f[formats.METADATA_KEY].dtype.kind == "U"


def test_weight_files_on_gcs_round_trip_and_name_the_url(gcs):
  """gs:// weights: written by one upload, read and peeked through one local copy, and
  a damaged object's message names its URL (not the temporary copy)."""
  from funmatch import fileio  # pylint: disable=import-outside-toplevel
  arrays = {"a/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
  for suffix, write in ((".npz", formats.write_npz),
                        (".safetensors", formats.write_safetensors)):
    url = f"{gcs.root}/weights_test/w{suffix}"
    write(url, arrays, {"model": "bit"})
    assert formats.peek(url).path == url and formats.peek(url).names == ("a/kernel",)
    weights = formats.read(url)
    assert weights.path == url and weights.metadata == {"model": "bit"}
    np.testing.assert_array_equal(weights.arrays["a/kernel"], arrays["a/kernel"])
  assert sorted(fileio.listdir(f"{gcs.root}/weights_test")) == ["w.npz", "w.safetensors"]
  damaged = f"{gcs.root}/weights_test/damaged.npz"
  fileio.write_atomic(damaged, b"not a zip file")
  message = one_line_error(formats.read, damaged)
  assert damaged in message and "not a valid .npz" in message and "/tmp" not in message


def test_object_array_npz_is_refused_without_running_code(tmp_path):
  path = tmp_path / "evil.npz"
  np.savez(path, kernel=np.array([Exploit(tmp_path)], dtype=object))
  message = one_line_error(formats.read, str(path))
  assert str(path) in message and "pickled" in message
  assert "safetensors" in message
  # Reading only the names (as option resolution does) refuses it too.
  assert "pickled" in one_line_error(formats.peek, str(path))
  assert not (tmp_path / MARKER).exists()


def test_plain_pickle_is_refused_without_running_code(tmp_path):
  path = tmp_path / "evil.npz"
  with open(path, "wb") as f:
    pickle.dump({"kernel": Exploit(tmp_path)}, f)
  message = one_line_error(formats.read, str(path))
  assert "pickled" in message and "safetensors" in message
  assert not (tmp_path / MARKER).exists()


def test_pickled_pth_is_refused_without_running_code(tmp_path):
  import torch  # pylint: disable=wrong-import-order
  path = tmp_path / "evil.pth"
  torch.save({"kernel": torch.zeros(2), "extra": Exploit(tmp_path)}, path)
  message = one_line_error(formats.read, str(path))
  assert str(path) in message and "pickled" in message
  assert "safetensors" in message
  assert not (tmp_path / MARKER).exists()


def test_pth_state_dicts_plain_wrapped_and_bfloat16(tmp_path):
  import torch  # pylint: disable=wrong-import-order
  state = {"w": torch.arange(6.0).reshape(2, 3),
           "h": torch.ones(2, dtype=torch.bfloat16)}
  torch.save(state, tmp_path / "plain.pt")
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()},
              "epoch": 3}, tmp_path / "wrapped.bin")
  for name in ("plain.pt", "wrapped.bin"):
    arrays = formats.read(str(tmp_path / name)).arrays
    assert set(arrays) == {"w", "h"}
    np.testing.assert_array_equal(arrays["w"], np.arange(6.0).reshape(2, 3))
    assert arrays["h"].dtype == np.float32


def test_truncated_and_garbled_files_name_the_path(tmp_path):
  arrays = {"a": np.random.default_rng(0).normal(size=(64, 64))}
  formats.write_npz(str(tmp_path / "good.npz"), arrays, {"x": 1})
  formats.write_safetensors(str(tmp_path / "good.safetensors"), arrays, {})
  torch.save({"a": torch.zeros(64, 64)}, tmp_path / "good.pth")
  names = ["good.npz", "good.safetensors", "good.pth"]
  for name in names:
    data = (tmp_path / name).read_bytes()
    for label, content in (("cut", data[:len(data) // 2]),
                           ("garbled", os.urandom(len(data)))):
      path = tmp_path / f"{label}-{name}"
      path.write_bytes(content)
      message = one_line_error(formats.read, str(path))
      assert str(path) in message and "re-download or re-export" in message
  assert "does not exist" in one_line_error(formats.read,
                                            str(tmp_path / "none.npz"))
  assert "unknown weights file type" in one_line_error(
      formats.read, str(tmp_path / "w.h5"))


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  message = one_line_error(formats.read, str(path))
  assert str(path) in message and "funmatch[torch]" in message


def test_save_params_checks_format_and_suffix(tmp_path):
  params = {"head": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  message = one_line_error(layouts.save_params, "vit", str(tmp_path / "a.npz"),
                           params, resolution=32, format="onnx")
  assert "onnx" in message and "safetensors" in message
  message = one_line_error(layouts.save_params, "vit", str(tmp_path / "a.npz"),
                           params, resolution=32, format="timm")
  assert "a.npz" in message and ".safetensors" in message
