"""Shared by the ConvNeXt / Swin tests: timm networks with random weights, the
files timm itself writes, and funmatch models loaded from them.

`load_with_spec` fits a state dict through the model's own spec (`WEIGHTS`, its
timm layout) with funmatch.weights.layouts.fit, so the check is exactly the
spec's name table and tensor layouts; the file tests go through the public
funmatch.weights calls.
"""
import jax
import numpy as np

from funmatch.weights import layouts

import torch  # pylint: disable=wrong-import-order
import timm_import  # pylint: disable=wrong-import-position

timm = timm_import.import_timm()


def images(res, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(
      -1, 1, (batch, res, res, 3)).astype(np.float32)


def randomize(network, seed=0, scale=0.3):
  """Random values everywhere (norm scales near 1, the rest N(0, scale^2)).

  A deep, wide network wants a smaller scale (as trained weights have): with
  0.3 its activations grow until float32 rounding alone exceeds 1e-4."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, value in network.state_dict().items():
      if not value.is_floating_point():
        continue
      noise = torch.randn(value.shape, generator=generator)
      is_scale = value.ndim == 1 and name.endswith("weight") and "norm" in name
      value.copy_(1 + 0.1 * noise if is_scale else scale * noise)
  return network.eval()


def timm_logits(network, x):
  with torch.no_grad():
    return network.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def state_arrays(network):
  return {k: v.numpy() for k, v in network.state_dict().items()}


save_state = timm_import.save_state_dict


def param_shapes(model, res):
  """{name: shape} of the model's params, without running initialisers."""
  variables = jax.eval_shape(model.init, jax.random.key(0), images(res, 1))
  return {name: tuple(value.shape)
          for name, value in layouts.flat_params(variables).items()}


def init_params(model, res):
  """Stand-in initial params (zeros): loading only needs their structure."""
  return layouts.unflat_params(
      {name: np.zeros(shape, np.float32)
       for name, shape in param_shapes(model, res).items()}, wrapped=False)


def timm_shapes_of(model, res, layout):
  """The model's params as the layout's file would name and shape them
  (views of one zero: no memory for the large variants)."""
  zero = np.zeros((), np.float32)
  return {layout.file_name(name): tuple(
              layout.to_file(name, np.broadcast_to(zero, shape)).shape)
          for name, shape in param_shapes(model, res).items()}


def meta_timm_shapes(name, **kwargs):
  """{state-dict name: shape} of a timm model, built on the meta device."""
  with torch.device("meta"):
    network = timm.create_model(name, pretrained=False, **kwargs)
  return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def load_with_spec(weights_spec, arrays, init, strict_head=True):
  """A timm state dict -> params through the spec's timm layout."""
  layout = weights_spec.layout("timm")
  return layouts.fit("timm file", dict(arrays), init,
                      layout, head=weights_spec.head, strict_head=strict_head,
                      model_description=weights_spec.describe(init),
                      hint=weights_spec.hint)


def assert_close(got, want):
  """<= 1e-4 relative to the logits' scale."""
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
