"""Shampoo's memory and time for one model: state bytes per parameter, update cost.

Measures the optimizer alone (no model forward/backward) on random gradients:
the update without a preconditioner recompute, the update with one (every
`preconditioning_compute_steps`-th step), and Adam's update for comparison.

  python tools/shampoo_cost.py --depth 50 --width 1 --block_size 128
"""
import argparse
import json
import sys
import time


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=50, help="BiT depth (26/50/101/152)")
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--block_size", type=int, default=128)
  p.add_argument("--method", default="eigh", choices=("eigh", "newton"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--output", default="")
  return p.parse_args(argv)


def state_bytes(state) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def timed(fn, *args, repeats):
  """Best-of-`repeats` seconds of fn(*args) (compiled beforehand)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from funmatch.models import bit  # pylint: disable=import-outside-toplevel
  from funmatch.optim import shampoo  # pylint: disable=import-outside-toplevel

  model = bit.Model(num_classes=args.num_classes, depth=args.depth, width=args.width)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, 64, 64, 3)))["params"])()
  num_params = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                       params)
  # start=1, every 2: count 1 recomputes, count 2 does not.
  opt = shampoo.shampoo(1e-3, block_size=args.block_size, start_preconditioning_step=1,
                        preconditioning_compute_steps=2, inverse_root_method=args.method)
  adam = optax.adam(1e-3)
  # grads and params are arguments, not closed-over constants XLA would fold.
  update = jax.jit(lambda s, count, g, p: opt.update(g, s._replace(count=count), p))
  adam_update = jax.jit(lambda s, g, p: adam.update(g, s, p))
  state = jax.jit(opt.init)(params)
  adam_state = adam.init(params)

  start = time.perf_counter()
  jax.block_until_ready(update(state, jnp.int32(2), grads, params))
  compile_seconds = time.perf_counter() - start
  plain = timed(update, state, jnp.int32(2), grads, params, repeats=args.repeats)
  recompute = timed(update, state, jnp.int32(1), grads, params, repeats=args.repeats)
  adam_seconds = timed(adam_update, adam_state, grads, params, repeats=args.repeats)
  result = dict(
      model=f"BiT-R{args.depth}x{args.width:g}", params=num_params,
      block_size=args.block_size, method=args.method,
      shampoo_state_bytes_per_param=state_bytes(state) / num_params,
      adam_state_bytes_per_param=state_bytes(adam_state) / num_params,
      shampoo_update_seconds=plain, shampoo_update_with_recompute_seconds=recompute,
      recompute_seconds=recompute - plain, adam_update_seconds=adam_seconds,
      compile_seconds=compile_seconds, device=str(jax.devices()[0]))
  for key, value in result.items():
    print(f"{key:40s} {value:.4g}" if isinstance(value, float) else f"{key:40s} {value}")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
