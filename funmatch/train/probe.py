"""Linear probe: how linearly separable the frozen student's features are.

The standard evaluation of self-supervised representations (SEED, MoCo): the
student's features (`pre_logits` by default; its classification head and any
projection head are ignored) are extracted, without augmentation, for the
training split and for each eval set; they are standardised with the training
features' mean and standard deviation; a multinomial logistic regression
(softmax + L2 on the weights) is fit full-batch in JAX by L-BFGS for a fixed
number of iterations, so the result is deterministic. The L2 strength is chosen
from `L2_GRID` on a fixed hold-out of the training features (every 10th
example), then the probe is refit on all of them.

The training split is read with the eval pipeline from `config.input` (its
source and split) and the preprocessing of the first eval set (`eval_crop`,
`eval_resize_ratio`, `image_size`), so train and eval features are made alike.
Every feature stays in host memory: for ImageNet-size splits that is
N x d float32 (1.28M x 1280 = 6.5 GB for MobileNetV3).
"""
import functools
import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
ITERATIONS = 300
HOLDOUT_EVERY = 10
PREPROCESSING_KEYS = ("eval_crop", "eval_resize_ratio", "resize_antialias", "image_size")


def make_feature_fn(student: nn.Module, tap: str = "pre_logits"):
  """A jitted `(params, images) -> float32 [B, D]` of the student's `tap`."""
  def features(params, images):
    _, taps = student.apply({"params": params}, images, train=False)
    x = taps[tap].astype(jnp.float32)
    if x.ndim == 4:
      x = jnp.mean(x, axis=(1, 2))
    elif x.ndim == 3:
      x = x[:, 0]
    return x
  return jax.jit(features)


def _to_host(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def extract(feature_fn, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D], labels [N]) over one pass of eval `batches` (padding dropped)."""
  features, labels = [], []
  for batch in batches:
    x = feature_fn(params, batch["images"]["student"])
    mask = _to_host(batch["mask"]).astype(bool)
    features.append(_to_host(x)[mask])
    labels.append(_to_host(batch["label"])[mask])
  return np.concatenate(features), np.concatenate(labels)


def standardize(train: np.ndarray, *others: np.ndarray):
  """Each array standardised with the mean and std of `train` (per feature)."""
  mean = train.mean(0)
  std = train.std(0) + 1e-6
  return tuple((x - mean) / std for x in (train, *others))


def fit_logistic(features, labels, num_classes: int, l2: float,
                 iterations: int = ITERATIONS):
  """Weights (W [D, C], b [C]) minimising mean softmax CE + l2/2 * |W|^2."""
  targets = jax.nn.one_hot(jnp.asarray(labels), num_classes)
  return _solve(jnp.asarray(features, jnp.float32), targets, jnp.float32(l2), iterations)


@functools.partial(jax.jit, static_argnums=(3,))
def _solve(features, targets, l2, iterations):
  """L-BFGS (zoom line search) from zero weights for a fixed number of iterations."""
  def objective(params):
    logits = features @ params["w"] + params["b"]
    ce = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((features.shape[1], targets.shape[1])),
            "b": jnp.zeros(targets.shape[1])}
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, iterations, step, (params, solver.init(params)))
  return params


def accuracy(params, features, labels) -> float:
  # numpy: as eager jax ops, each of these would compile per features shape.
  w, b = (np.asarray(params[k], np.float32) for k in ("w", "b"))
  logits = np.asarray(features, np.float32) @ w + b
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def probe(train: tuple[np.ndarray, np.ndarray],
          evals: Mapping[str, tuple[np.ndarray, np.ndarray]],
          num_classes: int) -> dict[str, float]:
  """Fits the probe on `train` features; returns `<eval>/linear_probe_top1`."""
  train_x, train_y = train
  holdout = np.arange(len(train_y)) % HOLDOUT_EVERY == 0
  fit_x, held_x = standardize(train_x[~holdout], train_x[holdout])
  scores = {l2: accuracy(fit_logistic(fit_x, train_y[~holdout], num_classes, l2),
                         held_x, train_y[holdout]) for l2 in L2_GRID}
  best = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger L2
  names = list(evals)
  train_x, *eval_xs = standardize(train_x, *(evals[n][0] for n in names))
  weights = fit_logistic(train_x, train_y, num_classes, best)
  results = {f"{name}/linear_probe_top1": accuracy(weights, x, evals[name][1])
             for name, x in zip(names, eval_xs)}
  results["linear_probe/l2"] = best
  results["linear_probe/train_top1"] = accuracy(weights, train_x, train_y)
  logging.info("linear probe: l2=%g (hold-out top-1 %s) -> %s", best,
               {k: round(v, 4) for k, v in scores.items()}, results)
  return results


def train_split_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.input as an eval set: the first eval set's preprocessing and batch size."""
  train_config = config.input.copy_and_resolve_references()
  first = next(iter(config.evals.values()), None)
  with train_config.unlocked():
    if first is not None:
      for key in PREPROCESSING_KEYS:
        if key in first:
          train_config[key] = first[key]
      train_config.batch_size = int(first.batch_size)
  return train_config


class LinearProbe:
  """The probe of one run: its student, train split, eval sets and mesh."""

  def __init__(self, student: nn.Module, config: ml_collections.ConfigDict,
               resolution: int, mesh: Any, num_classes: int, tap: str = "pre_logits"):
    self.feature_fn = make_feature_fn(student, tap)
    self.config = config
    self.views = {"student": int(resolution)}
    self.mesh = mesh
    self.num_classes = num_classes
    self._train_batches = None

  def _iterator(self, cfg, where):
    """An eval pass over the split `cfg` configures, opened here: the training
    split as an eval set is its own configured split (its image_size may be the
    eval set's), opened once per probe (see __call__)."""
    from funmatch import parallel  # pylint: disable=import-outside-toplevel
    from funmatch.data import pipeline, sources  # pylint: disable=import-outside-toplevel
    return pipeline.make_eval_iterator(sources.open_source(cfg, where), self.views,
                                       sharding=parallel.batch_sharding(self.mesh))

  def eval_sets(self) -> dict[str, Any]:
    """The config's eval sets, with the student's view only."""
    result = {}
    for name, eval_config in self.config.evals.items():
      result[name] = self._iterator(eval_config, f"evals.{name}")
    return result

  def __call__(self, params, eval_sets: Mapping[str, Any] | None = None) -> dict[str, float]:
    if self._train_batches is None:
      self._train_batches = self._iterator(train_split_config(self.config), "input")
    eval_sets = self.eval_sets() if eval_sets is None else eval_sets
    train = extract(self.feature_fn, params, self._train_batches)
    evals = {name: extract(self.feature_fn, params, batches)
             for name, batches in eval_sets.items()}
    return probe(train, evals, self.num_classes)
