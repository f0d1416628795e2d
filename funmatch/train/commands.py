"""The heavy bodies of funmatch-distill/-train/-eval, run once the CLI
(funmatch/train/cli.py, which stays light) has parsed and checked the flags."""
import jax

from funmatch import fileio, parallel
from funmatch.train import build, evaluate as evaluate_lib


def train(config, workdir: str, mode: str, show: bool) -> None:
  """Trains (mode 'train') or distils ('distill'); prints the final table if `show`."""
  build.validate(config, mode)
  # Lazy: the loop brings TensorFlow (seconds); a config mistake answers before it.
  from funmatch.train import loop  # pylint: disable=import-outside-toplevel
  results = loop.train_and_evaluate(config, workdir, mode)
  if results and show:
    print(evaluate_lib.format_table(results), flush=True)


def evaluate(config, workdir: str, mode: str, step: int | None, output: str | None,
             student_only: bool) -> None:
  """Evaluates a checkpoint of `workdir`; process 0 prints the table and writes the JSON."""
  run = build.build(config, mode, workdir=workdir, needs=build.Needs(
      teachers=not student_only, checkpoint_of=workdir, step=step, data="eval",
      optimizer=False))
  step = run.checkpoint_step
  params = jax.device_put(run.models.student_params, parallel.replicated(run.mesh))
  results = {"step": step, **evaluate_lib.Evaluator(run)(params)}
  output = output or fileio.join(workdir, f"eval_{step}.json")
  if jax.process_index() == 0:
    print(evaluate_lib.format_table(results), flush=True)
    evaluate_lib.write_json(output, results)
    print(f"wrote {output}", flush=True)
