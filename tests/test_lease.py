"""The run-directory lease and the compare-and-swap it stands on, on local disk and real S3."""

import json
import socket
import subprocess
import sys
import time

import pytest

from curation import storage
from curation.pipeline.lease import RunLease, RunLockedError
from curation.pipeline.plan import RunDirectory
from s3server import make_bucket, moto_s3


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as options:
        make_bucket(options, "lease-bucket")
        yield options


def _compare_and_swap_contract(uri, options):
    first = storage.compare_and_swap(uri, b"one", None, options)
    assert first is not None
    assert storage.compare_and_swap(uri, b"two", None, options) is None, "create only if absent"
    data, version = storage.read_versioned(uri, options)
    assert (data, version) == (b"one", first)
    assert storage.compare_and_swap(uri, b"two", "not-the-version", options) is None
    second = storage.compare_and_swap(uri, b"two", first, options)
    assert second not in (None, first)
    assert storage.compare_and_swap(uri, b"three", first, options) is None, "a stale version loses"
    assert storage.read_versioned(uri, options)[0] == b"two"
    assert storage.read_versioned(uri + "-missing", options) == (None, None)


def test_compare_and_swap_on_local_disk(tmp_path):
    _compare_and_swap_contract(str(tmp_path / "run" / "_lease.json"), None)


def test_compare_and_swap_on_s3_uses_conditional_puts(s3):
    _compare_and_swap_contract("s3://lease-bucket/run/_lease.json", s3)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_holder_is_refused_until_release(where, tmp_path, s3):
    run = RunDirectory(str(tmp_path) if where == "local" else "s3://lease-bucket/runs", f"r-{where}",
                       None if where == "local" else s3)
    with RunLease(run, ttl_s=60):
        with pytest.raises(RunLockedError, match="in use by another run"):
            RunLease(run, ttl_s=60).acquire()
    with RunLease(run, ttl_s=60) as again:
        assert again.version is not None


def _holder(**fields) -> bytes:
    return json.dumps({"token": "t", "host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time(),
                       "ttl_s": 60, "released": False} | fields).encode()


def test_stale_lease_is_taken_over(tmp_path):
    run = RunDirectory(str(tmp_path), "r")
    storage.write_bytes(run.path("_lease.json"), _holder(heartbeat=time.time() - 61))
    with RunLease(run, ttl_s=60) as lease:
        assert json.loads(storage.read_bytes(lease.uri))["token"] == lease.owner["token"]


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = RunDirectory(str(tmp_path), "r")
    storage.write_bytes(run.path("_lease.json"), _holder(host=socket.gethostname(), pid=int(finished.stdout)))
    with RunLease(run, ttl_s=60):
        pass
    storage.write_bytes(run.path("_lease.json"), _holder(host="elsewhere"))  # fresh, another host: refused
    with pytest.raises(RunLockedError):
        RunLease(run, ttl_s=60).acquire()


def test_heartbeat_renews_and_notices_a_takeover(tmp_path):
    run = RunDirectory(str(tmp_path), "r")
    with RunLease(run, ttl_s=0.4) as lease:
        first = json.loads(storage.read_bytes(lease.uri))["heartbeat"]
        time.sleep(0.35)
        assert json.loads(storage.read_bytes(lease.uri))["heartbeat"] > first, "renewed every ttl/4"
        storage.write_bytes(lease.uri, _holder())  # another run broke it
        time.sleep(0.35)
        assert lease.lost
    assert json.loads(storage.read_bytes(run.path("_lease.json")))["host"] == "elsewhere", "not released over"


def test_a_failed_renewal_is_retried_not_fatal(tmp_path, monkeypatch):
    run = RunDirectory(str(tmp_path), "r")
    real, calls = storage.compare_and_swap, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first renewal: a storage hiccup
            raise OSError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "compare_and_swap", flaky)
    with RunLease(run, ttl_s=0.4) as lease:
        time.sleep(0.45)
        assert calls["n"] >= 4 and not lease.lost, "renewals went on after the failed one"
    assert json.loads(storage.read_bytes(run.path("_lease.json")))["released"] is True
