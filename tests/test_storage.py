"""curation.storage against local folders and a real S3 endpoint (moto's server)."""

import os
import socket
import time

import pytest

from curation import storage
from s3server import DUMMY_KEY, DUMMY_SECRET, make_bucket, moto_s3


@pytest.fixture(scope="module")
def s3():
    """storage_options for a live moto S3 server with bucket `test-bucket`."""
    with moto_s3() as options:
        make_bucket(options, "test-bucket")
        yield options


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _round_trip(root: str, options: dict | None) -> list[str]:
    """Write, list, read, remove under `root`; returns the listing (the caller checks its form)."""
    for name in ("b/two.JPG", "a/one.png", "a/deeper/three.jpg", "notes.txt"):
        storage.write_bytes(storage.join(root, name), name.encode(), options)
    listed = storage.list_files(root, options, (".jpg", ".png"))
    assert len(listed) == 3 and listed == sorted(listed)
    for uri in listed:
        assert storage.read_bytes(uri, options) == uri[len(storage.join(root, "")):].encode()
    assert len(storage.list_files(root, options)) == 4
    target = storage.join(root, "notes.txt")
    assert storage.exists(target, options)
    storage.remove(target, options)
    assert not storage.exists(target, options)
    storage.remove(target, options)  # missing_ok by default
    with pytest.raises(FileNotFoundError):
        storage.remove(target, options, missing_ok=False)
    return listed


def test_local_round_trip_gives_absolute_paths(tmp_path):
    listed = _round_trip(str(tmp_path / "data"), None)
    assert listed == [str(tmp_path / "data" / p) for p in ("a/deeper/three.jpg", "a/one.png", "b/two.JPG")]


def test_local_relative_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("out/x.bin", b"1")
    assert storage.read_bytes(f"file://{tmp_path}/out/x.bin") == b"1"
    assert storage.list_files("out") == [str(tmp_path / "out" / "x.bin")]
    assert storage.join("out", "") == f"{tmp_path}/out/"
    assert storage.list_files("missing-folder") == []


def test_local_write_is_atomic_and_replaces(tmp_path):
    target = str(tmp_path / "deep" / "er" / "file.json")
    storage.write_bytes(target, b"old")
    storage.write_bytes(target, b"new")
    assert storage.read_bytes(target) == b"new"
    assert os.listdir(tmp_path / "deep" / "er") == ["file.json"]  # no temp file left behind


def test_join_is_uri_aware_and_refuses_escapes(tmp_path):
    assert storage.join("s3://bucket/prefix/", "a", "b.jpg") == "s3://bucket/prefix/a/b.jpg"
    assert storage.join("s3://bucket", "") == "s3://bucket/"
    assert storage.join("s3://bucket/p", "/sub/", "x") == "s3://bucket/p/sub/x"
    assert storage.join(str(tmp_path), "kept", "a/b.png") == f"{tmp_path}/kept/a/b.png"
    assert storage.join(f"file://{tmp_path}", "x") == f"{tmp_path}/x"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.join("s3://bucket/p", "../other")


def test_unknown_scheme_and_options_are_errors():
    with pytest.raises(ValueError, match=r"gs://b/x.*s3://"):
        storage.filesystem("gs://b/x")
    with pytest.raises(ValueError, match=r"\['endpoint'\].*endpoint_url"):
        storage.filesystem("s3://b/x", {"endpoint": "http://x"})


def test_s3_filesystem_defaults(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem("s3://bucket/some/prefix/", {"key": "k", "secret": "s"})
    assert path == "bucket/some/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.config_kwargs == storage.DEFAULT_S3_CONFIG
    own = {"connect_timeout": 1}
    fs, _ = storage.filesystem("s3://bucket", {"endpoint_url": "http://other:1", "config_kwargs": own})
    assert fs.endpoint_url == "http://other:1" and fs.config_kwargs == own


def test_s3_round_trip_gives_full_uris(s3):
    listed = _round_trip("s3://test-bucket/round", s3)
    assert listed == [f"s3://test-bucket/round/{p}" for p in ("a/deeper/three.jpg", "a/one.png", "b/two.JPG")]
    assert storage.list_files("s3://test-bucket/nothing-here", s3) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bounded_reads_never_hold_more_than_the_limit_plus_one(where, s3, tmp_path):
    root, options = (str(tmp_path), None) if where == "local" else ("s3://test-bucket/bounded", s3)
    for name, data in (("big", b"x" * 1000), ("small", b"abc"), ("empty", b"")):
        storage.write_bytes(storage.join(root, name), data, options)
    assert storage.read_bytes(storage.join(root, "big"), options, max_bytes=10) == b"x" * 11
    assert storage.read_bytes(storage.join(root, "small"), options, max_bytes=10) == b"abc"
    assert storage.read_bytes(storage.join(root, "empty"), options, max_bytes=10) == b""  # S3: 416 on a range


@pytest.mark.parametrize("where", ["local", "s3"])
def test_streamed_writes_appear_whole_or_not_at_all(where, s3, tmp_path):
    root, options = (str(tmp_path), None) if where == "local" else ("s3://test-bucket/streamed", s3)
    target = storage.join(root, "sub", "big.bin")
    chunk = os.urandom(1 << 20)
    with storage.open_for_write(target, options) as handle:
        for _ in range(6):  # more than one S3 multipart block (5 MiB)
            handle.write(chunk)
        assert not storage.exists(target, options)  # nothing visible before the block completes
    assert storage.read_bytes(target, options) == chunk * 6
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.open_for_write(storage.join(root, "sub", "broken.bin"), options) as handle:
            handle.write(chunk * 6)
            raise RuntimeError("writer failed")
    assert storage.list_files(storage.join(root, "sub"), options) == [target]  # no partial file, no temp file


def test_s3_listing_sees_files_written_by_another_process(s3):
    """No stale listing cache: Ray workers write files the driver lists afterwards."""
    import s3fs

    root = "s3://test-bucket/fresh"
    storage.write_bytes(storage.join(root, "a.json"), b"{}", s3)
    assert len(storage.list_files(root, s3)) == 1
    s3fs.S3FileSystem(skip_instance_cache=True, **s3).pipe_file("test-bucket/fresh/b.json", b"{}")
    assert len(storage.list_files(root, s3)) == 2
    assert storage.exists(storage.join(root, "b.json"), s3)


def test_s3_credentials_and_endpoint_from_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])
    storage.write_bytes("s3://test-bucket/env/x.bin", b"env", {})
    assert storage.read_bytes("s3://test-bucket/env/x.bin", None) == b"env"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_through_pyarrow_filesystem(s3, tmp_path, where):
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri, options = (str(tmp_path / "t.parquet"), None) if where == "local" else ("s3://test-bucket/pq/t.parquet", s3)
    table = pa.table({"id": ["a", "b"], "score": pa.array([0.25, 0.75], pa.float32())})
    fs, path = storage.pyarrow_filesystem(uri, options)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.exists(uri, options)


def test_check_reachable_passes_for_live_bucket_and_local(s3, tmp_path):
    storage.check_reachable("s3://test-bucket/any/prefix", s3)
    storage.check_reachable(str(tmp_path / "not-yet-created"), None)


def test_check_reachable_missing_bucket_names_it(s3):
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        storage.check_reachable("s3://no-such-bucket/x", s3)


def test_unreachable_endpoint_fails_fast_without_leaking_secrets():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = {"endpoint_url": endpoint, "key": DUMMY_KEY, "secret": DUMMY_SECRET}
    start = time.perf_counter()
    with pytest.raises(storage.StorageUnreachableError) as caught:
        storage.check_reachable("s3://bucket/data", options)
    assert time.perf_counter() - start < 20
    message = str(caught.value)
    assert endpoint in message and "s3://bucket/data" in message
    assert DUMMY_SECRET not in message and DUMMY_KEY not in message


def _fill_backlog(address) -> list:
    """Connect until the kernel stops completing handshakes: later connects then hang."""
    fillers = []
    for _ in range(16):
        try:
            fillers.append(socket.create_connection(address, timeout=0.3))
        except TimeoutError:
            return fillers
    pytest.skip("could not fill the listen backlog on this kernel")


def test_silent_endpoint_hits_the_probe_deadline(monkeypatch):
    """A server that accepts nothing (full backlog) must not hang the job: the probe has a deadline."""
    monkeypatch.setattr(storage, "PROBE_TIMEOUT_S", 2.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        fillers = _fill_backlog(server.getsockname())
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(storage.StorageUnreachableError, match=endpoint):
            storage.check_reachable("s3://bucket", {"endpoint_url": endpoint, "key": "k", "secret": "s"})
        assert time.perf_counter() - start < 6
        for sock in fillers:
            sock.close()


def test_credentials_in_an_s3_uri_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match="holds credentials") as caught:
        storage.check_reachable(f"s3://AKIAEXAMPLE:{DUMMY_SECRET}@bucket/data", {})
    assert DUMMY_SECRET not in str(caught.value) and "s3://AKIAEXAMPLE:***@bucket/data" in str(caught.value)
