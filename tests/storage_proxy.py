"""A localhost HTTP proxy in front of the Cloud Storage emulator that answers 503.

Every client funmatch uses (google-cloud-storage, gcsfs, tensorstore) is pointed
at the proxy instead of fake-gcs-server (`environment()`); the proxy forwards each
request unchanged, except the ones a `Fault` claims: those get
`503 Service Unavailable` (or another status, e.g. 429), as Cloud Storage answers
during an incident. A fault answers the first `count` requests it matches (a
burst), or all of them until it is cleared (`count=None`: an outage). A hook
(`before`) does something real to the emulator at an exact moment of a run, e.g.
deletes its bucket when a checkpoint's first upload arrives.
"""
import dataclasses
import http.client
import http.server
import json
import re
import threading
import urllib.parse
from typing import Optional

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                "te", "trailer", "upgrade"}


@dataclasses.dataclass
class Fault:
  """`status` (503) for requests whose "METHOD /path?query" matches `pattern` (a regex)."""
  pattern: str
  count: Optional[int] = None  # None: every match, until cleared
  answered: int = 0
  status: int = 503

  def claims(self, request_line: str) -> bool:
    if not re.search(self.pattern, request_line):
      return False
    if self.count is not None and self.answered >= self.count:
      return False
    self.answered += 1
    return True


class StorageProxy:
  """A running proxy to `upstream` (http://127.0.0.1:PORT) on a free port."""

  def __init__(self, upstream: str):
    self.upstream = urllib.parse.urlsplit(upstream)
    self.faults: list[Fault] = []
    self.hooks: list[Fault] = []  # with .action, run before forwarding (before())
    self.requests: list[str] = []  # "METHOD /path?query" of everything seen
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
            if size == 0:
              return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      def _handle(self):
        body = self._body()
        line = f"{self.command} {self.path}"
        with proxy._lock:  # pylint: disable=protected-access
          proxy.requests.append(line)
          refused = next((f for f in proxy.faults if f.claims(line)), None)
          # Held under the lock: no other request passes while the hook acts.
          for hook in [h for h in proxy.hooks if h.claims(line)]:
            hook.action()
        if refused:
          self._reply(refused.status, {"Content-Type": "application/json"}, json.dumps(
              {"error": {"code": refused.status,
                         "message": "injected by the test proxy"}}).encode())
          return
        status, headers, data = proxy._forward(  # pylint: disable=protected-access
            self.command, self.path, self.headers, body)
        self._reply(status, headers, data)

      def _reply(self, status, headers, data):
        self.send_response(status)
        for key, value in headers.items():
          if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    class Server(http.server.ThreadingHTTPServer):
      def handle_error(self, request, client_address):
        pass  # a client that hung up early (range reads, an aborted retry)

    self._server = Server(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def _forward(self, method, path, headers, body):
    connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port,
                                            timeout=60)
    try:
      sent = {k: v for k, v in headers.items()
              if k.lower() not in _HOP_HEADERS and k.lower() != "host"}
      sent["Host"] = self.upstream.netloc
      sent["Content-Length"] = str(len(body))
      connection.request(method, path, body=body, headers=sent)
      response = connection.getresponse()
      data = response.read()
      out = dict(response.getheaders())
      upstream = f"{self.upstream.scheme}://{self.upstream.netloc}"
      for key in list(out):  # resumable-upload URLs must come back here too
        if key.lower() == "location":
          out[key] = out[key].replace(upstream, self.url)
      return response.status, out, data
    finally:
      connection.close()

  def fail(self, pattern: str, count: Optional[int] = None, status: int = 503) -> Fault:
    """From now on answer `status` to `count` requests matching `pattern` (None: all)."""
    fault = Fault(pattern, count, status=status)
    with self._lock:
      self.faults.append(fault)
    return fault

  def before(self, pattern: str, action) -> Fault:
    """Runs `action()` once, before the first request matching `pattern` goes
    upstream (e.g. deletes the bucket as a checkpoint's first upload arrives)."""
    hook = Fault(pattern, count=1)
    hook.action = action
    with self._lock:
      self.hooks.append(hook)
    return hook

  def clear(self) -> None:
    with self._lock:
      self.faults.clear()
      self.hooks.clear()

  def environment(self, emulator_env: dict[str, str]) -> dict[str, str]:
    """The emulator's environment (tests/gcs_emulator.py) with the proxy's URL."""
    upstream = f"{self.upstream.scheme}://{self.upstream.netloc}"
    return {k: v.replace(upstream, self.url) for k, v in emulator_env.items()}

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()

