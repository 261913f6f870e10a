"""Test helper: a real `mlflow server` subprocess on a free local port (no tests here).

Started lean (one worker, job execution off: ~5 s and ~0.5 GB instead of 13 s and 3 GB), with a
sqlite backend and proxied artifacts under the given directory, so clients upload and download
artifacts through the server exactly as against a remote one.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 60.0


def stand_in_handler(status: int = 200, requests_served: list | None = None):
    """An http.server handler class answering every GET with `status` and MLflow's empty
    experiments list (enough for the start-up probe), recording (path, Authorization) of each."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if requests_served is not None:
                requests_served.append((self.path, self.headers.get("Authorization")))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"experiments": []}')

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def http_server(handler):
    """A threaded local HTTP server for the handler class; yields its `127.0.0.1:port`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before becoming "
                               f"healthy; its log ends:\n{_tail(log)}")
        if _healthy(url):
            return
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout:.0f} s; its log ends:\n"
                       f"{_tail(log)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, timeout: float = START_TIMEOUT_S):
    """Yield the URL (`http://127.0.0.1:<port>`) of a fresh MLflow server storing under
    `tmp_path` (mlflow.db, artifacts/, server.log); stop it, process group and all, on exit."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server",
               "--backend-store-uri", f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_path.resolve() / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, url, log, timeout)
        yield url
    finally:
        _stop(proc)
