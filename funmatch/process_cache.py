"""The persistent compilation cache for a CPU run of several processes on one machine.

JAX (0.10.2) keys a cache entry by, among others, the topology fingerprint of the
program's devices, and on CPU that fingerprint differs from process to process
for the same global devices. So process 1 never finds what process 0 wrote (only
process 0 writes), and JAX's `jax_share_binary_between_hosts` (process 0
compiles, the others wait for its executable under the same key) waits for a key
that never comes. With a warm cache, process 0 then loaded the train step while
process 1 compiled it, and gloo gives up when a collective's peers arrive more
than 30 s apart.

`share_when_on_one_machine` fixes the key: a program over the devices of several
processes is keyed by the global device list instead, the same in every process,
and the binary is shared. Both then find the same entries: both hit, or both
miss and process 0 compiles for all. The processes must agree on it, so it is
done only when every process runs on this machine with the same cache directory
(tests, a workstation); elsewhere the cache stays off for such runs.
Programs over one process's own devices bypass the cache: process 0 would find
them (from runs of one process) and process 1 not, which put the two over 30 s
apart on a loaded machine. Every process compiles those, as before; they are
small (a step's programs span every process).
"""
import hashlib
import logging
import os
import socket

log = logging.getLogger("funmatch")

# How long the others wait for process 0's executable: a compile of the train step.
SHARE_TIMEOUT_MS = 10 * 60 * 1000
# How long each waits for the others to say where they run (all have just started).
AGREE_TIMEOUT_MS = 60 * 1000


def share_when_on_one_machine() -> bool:
  """True: the cache stays on and programs spanning processes are shared.

  False (another machine among the processes, or a JAX without the hooks used
  here): the caller switches the cache off for this run.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import cache_key, compiler, distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  original = getattr(cache_key, "_hash_accelerator_config", None)
  get_key = getattr(compiler, "_get_cache_key", None)
  if client is None or original is None or get_key is None or not hasattr(
      jax.config, "jax_share_binary_between_hosts"):
    return False
  if not _all_processes_here(client, jax.process_index(), jax.process_count()):
    return False
  if not getattr(original, "funmatch_global", False):
    cache_key._hash_accelerator_config = _global_devices_hash(original)  # pylint: disable=protected-access
    compiler._get_cache_key = _spanning_processes_only(get_key)  # pylint: disable=protected-access
  jax.config.update("jax_share_binary_between_hosts", True)
  jax.config.update("jax_share_binary_between_hosts_timeout_ms", SHARE_TIMEOUT_MS)
  if jax.process_index() == 0:
    log.info("multi-process CPU run on one machine: compiled programs are shared")
  return True


def _all_processes_here(client, index: int, count: int) -> bool:
  """Every process says where it runs; all decide alike from the same list."""
  import jax  # pylint: disable=import-outside-toplevel
  cache_dir = os.path.realpath(jax.config.jax_compilation_cache_dir or "")
  where = f"{socket.gethostname()}|{cache_dir}"
  client.key_value_set(f"funmatch/process_cache/{index}", where)
  everyone = {client.blocking_key_value_get(f"funmatch/process_cache/{i}", AGREE_TIMEOUT_MS)
              for i in range(count)}
  return everyone == {where}


def _global_devices_hash(original):
  """JAX's accelerator hash, made the same in every process for programs whose
  devices belong to several processes."""
  def hash_accelerator_config(hash_obj, accelerators):
    devices = list(accelerators.flat)
    if len({d.process_index for d in devices}) < 2:
      return original(hash_obj, accelerators)
    # Every process sees the same list; the machine is the same for all of them.
    described = repr([(d.platform, d.device_kind, d.id, d.process_index) for d in devices])
    hash_obj.update(hashlib.sha256(
        f"funmatch-global|{socket.gethostname()}|{described}".encode()).digest())
    return None
  hash_accelerator_config.funmatch_global = True
  return hash_accelerator_config


def _spanning_processes_only(get_key):
  """JAX's cache key for programs over several processes' devices; None (no cache)
  for the others."""
  def get_cache_key(options, backend, computation, devices, *args, **kwargs):
    if len({d.process_index for d in devices.flat}) < 2:
      return None
    return get_key(options, backend, computation, devices, *args, **kwargs)
  return get_cache_key
