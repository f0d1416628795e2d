"""gcsfs, retrying by funmatch.fileio's one policy (retry_policy()).

gcsfs wraps its request methods in its own `retry_request` (6 attempts, up to
~35 s, fixed when gcsfs is imported). This subclass re-wraps the undecorated
methods with `fileio.retrying`, so that gcsfs retries the same failures (its
`is_retriable`: 429, 5xx, dropped connections; never a 404) for as long as the
policy allows and then fails with an error naming the bound. fileio registers
it for gs:// and gcs:// with fsspec, so epath and Orbax's metadata files use it
too.
"""
import functools

import gcsfs
from gcsfs import retry as gcsfs_retry

from funmatch import fileio


def _transient(e: BaseException) -> bool:
  if isinstance(e, FileNotFoundError):
    return False
  return gcsfs_retry.is_retriable(e)


def _with_policy(name: str):
  undecorated = getattr(gcsfs.GCSFileSystem, name).__wrapped__

  @functools.wraps(undecorated)
  async def method(self, *args, **kwargs):
    return await fileio.retrying(undecorated, self, *args, transient=_transient, **kwargs)
  return method


class RetryingGCSFileSystem(gcsfs.GCSFileSystem):
  """gcsfs.GCSFileSystem with fileio's retry policy on every request."""

  _request = _with_policy("_request")
  _get_file_request = _with_policy("_get_file_request")
  _get_file_concurrent = _with_policy("_get_file_concurrent")
