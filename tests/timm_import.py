"""Imports timm beside the CPU-only torch the [test] extra installs.

timm imports torchvision at import time (timm/layers/norm_act.py and
create_norm.py take FrozenBatchNorm2d from torchvision.ops.misc; timm/data
takes torchvision.transforms). The only torchvision on PyPI that accepts
torch==2.13.0 is a CUDA build: its C++ ops (`_C.so`) need libtorch_cuda.so,
so `import torchvision` dies registering meta kernels for those ops
("operator torchvision::nms does not exist"). timm's model code never calls
the ops, so when that happens the registration module is skipped and the
pure-Python rest of torchvision imports as usual.
"""
import sys
import types


def import_timm():
  """The timm module (torchvision's op registration skipped if it fails)."""
  try:
    import torchvision  # pylint: disable=import-outside-toplevel,unused-import
  except RuntimeError:
    for name in [n for n in sys.modules
                 if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    # pylint: disable-next=import-outside-toplevel,unused-import,reimported
    import torchvision
  import timm  # pylint: disable=import-outside-toplevel
  return timm


def save_state_dict(network, path: str) -> str:
  """A torch network's state dict as timm writes it: .safetensors, else torch.save."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors import torch as safetensors_torch  # pylint: disable=import-outside-toplevel
  state = {k: v.contiguous() for k, v in network.state_dict().items()}
  if path.endswith(".safetensors"):
    safetensors_torch.save_file(state, path)
  else:
    torch.save(state, path)
  return path
