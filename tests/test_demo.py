"""funmatch-demo's pieces that need no training run."""
import ml_collections
from clu import parameter_overview

from funmatch import config_util
from funmatch.train import build, demo


def test_param_count_from_shapes_equals_the_built_params():
  config = ml_collections.ConfigDict(config_util.model_config(
      "bit", res=16, depth=[1, 1, 1, 1], width=0.5))
  _, params = build.build_model(config, 10, "model")
  assert demo.param_count(config) == parameter_overview.count_parameters(params) > 0
