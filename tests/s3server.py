"""A real S3 endpoint for tests: moto's server on a free local port (a helper module, no tests).

Usage:
    with moto_s3() as s3:          # {"endpoint_url": ..., "key": ..., "secret": ...}
        storage.write_bytes("s3://bucket/x", b"...", s3)

The dict is valid `storage_options` for curation.storage. Other processes (Ray workers) reach the
server over HTTP. moto keeps its buckets in process-global state, so two servers started in one
process share buckets: give each test its own bucket name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

DUMMY_KEY = "testing-access-key"
DUMMY_SECRET = "testing-secret-do-not-log"


@contextlib.contextmanager
def moto_s3() -> Iterator[dict]:
    """Start moto's S3 server on 127.0.0.1 (port chosen by the OS), stop it on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"endpoint_url": f"http://{host}:{port}", "key": DUMMY_KEY, "secret": DUMMY_SECRET}
    finally:
        server.stop()


def make_bucket(storage_options: dict, bucket: str) -> None:
    """Create `bucket` on the server (s3fs, as users would; no region: moto rejects it here)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    fs.mkdir(bucket)
