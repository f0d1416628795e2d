"""Multi-host start: joins this process to the others before any device use.

Every console entry point calls `initialize` first. Where the settings come
from (first match wins, field by field for the explicit ones):

1. flags `--coordinator_address HOST:PORT --num_processes N --process_id I`;
2. environment `FUNMATCH_COORDINATOR_ADDRESS`, `FUNMATCH_NUM_PROCESSES`,
   `FUNMATCH_PROCESS_ID` (the same three, e.g. from a launcher script);
3. `FUNMATCH_DISTRIBUTED=auto`: `jax.distributed.initialize()` with no
   arguments, JAX detecting the cluster itself (`off`: never initialize);
4. clusters detected here, also started with the no-argument call:
   a Cloud TPU VM (every worker of a pod runs the same command; JAX reads the
   worker list from the TPU metadata), a SLURM step with more than one task
   (`srun`: SLURM_JOB_ID, SLURM_PROCID, SLURM_STEP_NODELIST and SLURM_NTASKS /
   SLURM_STEP_NUM_TASKS > 1), Open MPI with more than one rank
   (OMPI_MCA_orte_hnp_uri and OMPI_COMM_WORLD_SIZE > 1);
5. otherwise one process: nothing is called.

`FUNMATCH_INITIALIZATION_TIMEOUT` (seconds, default 300) bounds how long a
process waits for the coordinator and the others. Settings a user can get wrong
(a missing coordinator, a process id out of range, an address without a port, a
coordinator that never answers) raise `UserError` before JAX is asked, because
JAX aborts the whole process (no exception) when it cannot reach the
coordinator.
"""
import contextlib
import errno
import inspect
import logging
import os
import socket
import time
from typing import Any

from funmatch.errors import UserError

FLAGS = {
    "coordinator_address": "HOST:PORT of process 0 (multi-host runs)",
    "num_processes": "number of processes of a multi-host run",
    "process_id": "this process's id in [0, num_processes)",
}
ENV_PREFIX = "FUNMATCH_"
TIMEOUT_ENV = "FUNMATCH_INITIALIZATION_TIMEOUT"
MODE_ENV = "FUNMATCH_DISTRIBUTED"
DEFAULT_TIMEOUT = 300

log = logging.getLogger("funmatch")


def initialize(coordinator_address: str | None = None,
               num_processes: int | str | None = None,
               process_id: int | str | None = None) -> tuple[int, int]:
  """Starts JAX's distributed runtime when this is a multi-process run.

  Arguments are the CLI flags (None when not given); they win over the
  environment. Returns (process_id, num_processes); (0, 1) for a single process.
  Must run before anything touches a JAX device.
  """
  address = coordinator_address or _env("COORDINATOR_ADDRESS")
  count = _int_setting("num_processes", num_processes, _env("NUM_PROCESSES"))
  index = _int_setting("process_id", process_id, _env("PROCESS_ID"))
  timeout = _timeout()
  if address is not None or count is not None or index is not None:
    return _explicit(address, count, index, timeout)
  mode = (os.environ.get(MODE_ENV) or "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise UserError(f"{MODE_ENV}={os.environ[MODE_ENV]!r} must be 'auto' or 'off'")
  if mode == "off":
    return 0, 1
  cluster = "FUNMATCH_DISTRIBUTED=auto" if mode == "auto" else detected_cluster()
  if cluster is None:
    return 0, 1
  return _automatic(cluster, timeout)


def detected_cluster() -> str | None:
  """The multi-process environment this process runs in, if any."""
  env = os.environ
  if (all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NODELIST"))
      and _int_or(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), 1) > 1):
    return "SLURM"
  if ("OMPI_MCA_orte_hnp_uri" in env
      and _int_or(env.get("OMPI_COMM_WORLD_SIZE"), 1) > 1):
    return "Open MPI"
  if _on_cloud_tpu_vm():
    return "Cloud TPU VM"
  return None


# ---------------------------------------------------------------------------
# Explicit settings (flags or FUNMATCH_* variables).


def _explicit(address: str | None, count: int | None, index: int | None,
              timeout: int) -> tuple[int, int]:
  if count is None:
    raise UserError("--num_processes is required with --coordinator_address or "
                    "--process_id (or set FUNMATCH_NUM_PROCESSES)")
  if count < 1:
    raise UserError(f"--num_processes={count} must be >= 1")
  if count == 1:
    if index not in (None, 0):
      raise UserError(f"--process_id={index} is outside [0, 1) for --num_processes=1")
    return 0, 1
  if address is None:
    raise UserError(f"--num_processes={count} needs --coordinator_address HOST:PORT "
                    "of process 0 (or FUNMATCH_COORDINATOR_ADDRESS)")
  if index is None:
    raise UserError(f"--num_processes={count} needs --process_id in [0, {count}) "
                    "for this process (or FUNMATCH_PROCESS_ID)")
  if not 0 <= index < count:
    raise UserError(f"--process_id={index} is outside [0, {count}) for "
                    f"--num_processes={count}")
  host, port = parse_address(address)
  log.info("process %d of %d: joining the coordinator at %s (waiting up to %d s for "
           "the others)", index, count, address, timeout)
  if index == 0:
    _check_coordinator_host(address, host, port)
  else:
    _wait_for_coordinator(address, host, port, index, count, timeout)
  _use_cpu_collectives()
  # "deactivate": under SLURM or Open MPI, JAX would otherwise still restrict
  # each process to one GPU (SLURM_LOCALID); explicit settings keep all of them.
  _jax_initialize(f"--coordinator_address {address}", address,
                  coordinator_address=address, num_processes=count,
                  process_id=index, initialization_timeout=timeout,
                  cluster_detection_method="deactivate")
  return index, count


def parse_address(address: str) -> tuple[str, int]:
  """('host', port) of 'host:port' or '[v6]:port'; UserError when malformed."""
  text = address.strip()
  host, sep, port_text = text.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if not sep or not host or ":" in host and not text.startswith("["):
    raise UserError(f"--coordinator_address {address!r} is not HOST:PORT (e.g. "
                    "10.0.0.1:1234, the address of process 0 and a free port)")
  try:
    port = int(port_text)
  except ValueError:
    port = -1
  if not 0 < port < 65536:
    raise UserError(f"--coordinator_address {address!r} has no valid port "
                    f"('{port_text}'); use HOST:PORT with a port in 1..65535")
  return host, port


def _resolve(address: str, host: str, port: int) -> list[tuple[Any, ...]]:
  try:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise UserError(f"--coordinator_address {address}: cannot resolve host '{host}' "
                    f"({e.strerror}); use process 0's hostname or IP") from None


def _check_coordinator_host(address: str, host: str, port: int) -> None:
  """Process 0 runs the coordinator: the host must be this machine, the port free."""
  infos = _resolve(address, host, port)
  for family, _, _, _, sockaddr in infos:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
      try:
        probe.bind((sockaddr[0], 0))
        break
      except OSError:
        continue
  else:
    raise UserError(f"--coordinator_address {address} does not name this machine, but "
                    "process 0 runs the coordinator there; start process 0 on that "
                    "host or give its own address")
  for family, any_address in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 here
    with probe:
      # gRPC binds with SO_REUSEADDR too, so TIME_WAIT leftovers are no conflict.
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind((any_address, port))
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise UserError(f"--coordinator_address {address}: port {port} is already in "
                          "use on this machine; choose another free port (the same on "
                          "every process)") from None
        continue
      return


def _wait_for_coordinator(address: str, host: str, port: int, index: int, count: int,
                          timeout: int) -> None:
  """Polls the coordinator's port: JAX would abort the process if it never opens."""
  deadline = time.monotonic() + timeout
  last_error = "no answer"
  while True:
    try:
      targets = _resolve(address, host, port)
    except UserError:
      if time.monotonic() >= deadline:
        raise
      targets = []  # DNS may lag behind a starting cluster: keep trying
    for family, kind, proto, _, sockaddr in targets:
      with socket.socket(family, kind, proto) as probe:
        probe.settimeout(2.0)
        try:
          probe.connect(sockaddr)
          return
        except OSError as e:
          last_error = e.strerror or type(e).__name__
    if time.monotonic() >= deadline:
      raise UserError(
          f"process {index} of {count} cannot reach the coordinator at {address} "
          f"within {timeout} s ({last_error}); check that process 0 runs with the same "
          "--coordinator_address, that the host is process 0's machine and that the "
          f"port is open between hosts ({TIMEOUT_ENV} sets the wait)")
    time.sleep(0.25)


# ---------------------------------------------------------------------------
# Detected clusters: JAX reads the settings itself.


def _automatic(cluster: str, timeout: int) -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  log.info("%s: starting jax.distributed with the cluster's settings", cluster)
  _use_cpu_collectives()
  _jax_initialize(cluster, None, initialization_timeout=timeout)
  return jax.process_index(), jax.process_count()


def _on_cloud_tpu_vm() -> bool:
  try:
    # Set when `import jax` found TPU chips and libtpu (a Cloud TPU VM).
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
  except ImportError:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES")
                or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


# ---------------------------------------------------------------------------
# JAX calls and small helpers.


def _use_cpu_collectives() -> None:
  """Cross-process collectives on the CPU backend go through gloo.

  Only the CPU client reads this option, so setting it on GPU/TPU hosts is
  harmless; a value the user chose (e.g. 'mpi') is kept.
  """
  import jax  # pylint: disable=import-outside-toplevel
  try:
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass  # an older JAX without the option (or without gloo)


def _compilation_cache_on_cpu() -> None:
  """A CPU run of several processes keeps the persistent cache only where they
  can share it (funmatch/process_cache.py: all on this machine)."""
  import jax  # pylint: disable=import-outside-toplevel
  from funmatch import process_cache  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
    if not process_cache.share_when_on_one_machine():
      _no_compilation_cache_on_cpu()


def _no_compilation_cache_on_cpu() -> None:
  """A CPU run of processes on several machines compiles everything afresh.

  JAX writes cache entries from process 0 only, and process 1's keys differ from
  process 0's, so with a warm cache (funmatch/cache.py) process 0 loads the train
  step while process 1 compiles it (seen with py-spy: 12-25 s on 2 CPU cores,
  jax 0.10.2); gloo gives up when a collective's peers arrive more than 30 s
  apart. Compiling on every process keeps them in step. Such runs are small CPU
  clusters; GPU and TPU hosts keep the cache.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu" and jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    log.info("multi-process CPU run: the persistent compilation cache is off")


def _jax_initialize(what: str, address: str | None, **kwargs) -> None:
  """jax.distributed.initialize, then the backend: its start is collective too.

  Every process exchanges its device topology while starting its backend, so
  all must start it, even those with nothing to compute (e.g. export on
  processes other than 0).
  """
  import jax  # pylint: disable=import-outside-toplevel
  known = inspect.signature(jax.distributed.initialize).parameters
  kwargs = {k: v for k, v in kwargs.items() if k in known}  # older JAX lack some
  # funmatch agrees on preemption itself (funmatch/train/preemption.py). JAX's
  # preemption service would install a C++ SIGTERM handler that only records the
  # signal: until the loop's own handler replaces it, SIGTERM would not end
  # the process.
  with contextlib.suppress(AttributeError, ValueError):
    jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(**kwargs)
    jax.devices()
    _compilation_cache_on_cpu()
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError, ValueError)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if address:
      raise UserError(f"cannot start the multi-host run ({what}): the coordinator at "
                      f"{address} failed ({reason}); check the address and port (free "
                      "on process 0, reachable from every host) and that every process "
                      "got the same settings") from None
    raise UserError(f"cannot start the multi-host run ({what}): jax.distributed failed "
                    f"({reason}); give --coordinator_address, --num_processes and "
                    f"--process_id, or set {MODE_ENV}=off to run this host alone") from None


def _env(name: str) -> str | None:
  value = os.environ.get(ENV_PREFIX + name)
  return value if value not in (None, "") else None


def _int_setting(name: str, flag: int | str | None, env: str | None) -> int | None:
  value, source = (flag, f"--{name}") if flag not in (None, "") else (
      env, f"{ENV_PREFIX}{name.upper()}")
  if value in (None, ""):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{source}={value!r} must be an integer") from None


def _int_or(text: str | None, default: int) -> int:
  try:
    return int(text) if text is not None else default
  except ValueError:
    return default


def _timeout() -> int:
  text = os.environ.get(TIMEOUT_ENV)
  if not text:
    return DEFAULT_TIMEOUT
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise UserError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
  return value
