"""funmatch: function-matching knowledge distillation for vision models (JAX/Flax)."""
__version__ = "0.1.0"
