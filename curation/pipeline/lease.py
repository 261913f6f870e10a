"""A lease on a run directory: one run at a time writes into `<output>/<run name>/`.

Two runs into one directory (an overlapping nightly cron) would delete each other's unrecorded
outputs and regroup the same images into different partitions, so one image could be finished
twice. The lease is a small JSON object, `_lease.json`, taken and renewed with compare-and-swap
(S3 conditional PUTs, a flock on local disk): its owner renews the heartbeat every ttl/4 seconds;
another run refuses to start while the heartbeat is fresher than the TTL, and takes the lease
over (logged) once it is older, or at once when its owner ran on this host and its process is
gone (a killed cron run resumes without waiting). Breaking one by hand: delete `_lease.json`.
Clocks of the hosts must agree to well within the TTL.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from curation import storage
from curation.pipeline.plan import RunDirectory

log = logging.getLogger(__name__)
LEASE_FILE = "_lease.json"


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLockedError(RuntimeError):
    """Another live run holds the run directory."""


class RunLease:
    """`with RunLease(run, ttl_s): ...` holds the lease for the block, renewing it in a thread.

    `lost` turns true when a renewal finds the lease taken over (this run was presumed dead):
    the owner must then stop before recording anything more.
    """

    def __init__(self, run: RunDirectory, ttl_s: float = 600.0):
        self.run, self.ttl_s = run, ttl_s
        self.uri = run.path(LEASE_FILE)
        self.owner = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.time()}
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, released: bool = False) -> bytes:
        return json.dumps(self.owner | {"heartbeat": time.time(), "ttl_s": self.ttl_s,
                                        "released": released}).encode()

    def acquire(self) -> None:
        data, version = storage.read_versioned(self.uri, self.run.options)
        if data is not None:
            self._check_free(json.loads(data))
        self.version = storage.compare_and_swap(self.uri, self._record(), version, self.run.options)
        if self.version is None:
            raise RunLockedError(f"{self.run.uri}: another run took the lease at the same moment; "
                                 "only one run may write a run directory at a time")
        self._thread = threading.Thread(target=self._renew, name="curation-lease", daemon=True)
        self._thread.start()

    def _check_free(self, holder: dict) -> None:
        age = time.time() - holder["heartbeat"]
        if holder.get("released"):
            return
        if holder["host"] == socket.gethostname() and not _alive(holder["pid"]):
            log.warning("taking over the lease of %s from pid %s, which is no longer running on this host",
                        self.run.uri, holder["pid"])
            return
        if age < self.ttl_s:
            raise RunLockedError(
                f"{self.run.uri} is in use by another run (host {holder['host']}, pid {holder['pid']}, "
                f"last heartbeat {age:.0f} s ago). Wait for it to finish; if that run is dead, its lease "
                f"expires {self.ttl_s:.0f} s after its last heartbeat (output.lease_ttl_s), or delete "
                f"{self.uri} to break it now.")
        log.warning("taking over the stale lease of %s (host %s, pid %s, no heartbeat for %.0f s)",
                    self.run.uri, holder["host"], holder["pid"], age)

    def _renew(self) -> None:
        """Every ttl/4: a failed write (storage hiccup) is retried at the next tick, so only ~3
        missed renewals in a row let the lease expire; a lost compare-and-swap means taken over."""
        while not self._stop.wait(self.ttl_s / 4):
            try:
                version = storage.compare_and_swap(self.uri, self._record(), self.version, self.run.options)
            except Exception as err:  # noqa: BLE001 - the thread must outlive a transient storage error
                log.warning("could not renew the lease on %s (%s: %s); retrying", self.run.uri, type(err).__name__, err)
                continue
            if version is None:
                self.lost = True
                log.error("lost the lease on %s: another run took it over", self.run.uri)
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost and self.version is not None:
            try:  # never mask the error that ended the run; an unreleased lease expires by itself
                storage.compare_and_swap(self.uri, self._record(released=True), self.version, self.run.options)
            except Exception as err:  # noqa: BLE001
                log.warning("could not release the lease on %s (%s); it expires after %.0f s", self.run.uri, err,
                            self.ttl_s)

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
