"""funmatch's cache directory: `FUNMATCH_CACHE` (default ~/.cache/funmatch).

`<cache>/jax` holds JAX's persistent compilation cache, so a second run of the
same command skips most XLA compilation (set FUNMATCH_COMPILE_CACHE=off to switch
it off).
"""
import os

COMPILE_CACHE_OFF = ("0", "off", "false", "no")
# Compilations shorter than this are not worth a file each.
MIN_COMPILE_SECONDS = 0.2


def root() -> str:
  return os.path.expanduser(os.environ.get("FUNMATCH_CACHE") or "~/.cache/funmatch")


def enable_compilation_cache() -> str | None:
  """Points JAX's persistent compilation cache at <cache>/jax; returns it (None: off)."""
  if os.environ.get("FUNMATCH_COMPILE_CACHE", "on").strip().lower() in COMPILE_CACHE_OFF:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  directory = os.path.join(root(), "jax")
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
