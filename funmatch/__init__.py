"""funmatch: function-matching knowledge distillation for vision models (JAX/Flax)."""
import time

__version__ = "0.1.0"
# When funmatch was first imported: the start of a command's start-up time.
IMPORTED_AT = time.perf_counter()
