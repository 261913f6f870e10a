"""Readers against hostile inputs, without Ray: every item is read, recorded as a failure with a
stable kind, or (transient errors) marked unavailable so its partition is redone later."""

import errno
import os

import numpy as np


from curation import storage
from curation.config import SourceConfig
from curation.pipeline.plan import Partition, scan_inputs
from curation.pipeline.read import UNAVAILABLE, decode_partition, iter_raw_items
import hostile


def items_of(root, name, fmt, **source_fields):
    source = SourceConfig(uri=str(root), format=fmt, **source_fields)
    return list(iter_raw_items(Partition("p", fmt, (name,)), source))


def kinds(items):
    return [(item.id, item.error.kind if item.error else "", item.whole_file) for item in items]


def test_corrupt_parquet_is_one_failed_row_for_the_file(tmp_path):
    expected = hostile.write_corrupt_parquet(tmp_path / "bad.parquet", 5, seed=1)
    items = items_of(tmp_path, "bad.parquet", "parquet")
    assert kinds(items) == [("bad.parquet", "corrupt", True)] and expected["failed_files"] == 1
    assert "ArrowInvalid" in items[0].error.message or "parquet" in items[0].error.message


def test_parquet_without_the_image_column_fails_each_row_with_the_columns_named(tmp_path):
    hostile.write_wrong_column_parquet(tmp_path / "wrong.parquet", 4, seed=2)
    items = items_of(tmp_path, "wrong.parquet", "parquet")
    assert [k for _, k, _ in kinds(items)] == ["no_image_column"] * 4
    assert [item.id for item in items] == [f"p2-{i}" for i in range(4)]
    assert "'jpg'" in items[0].error.message


def test_parquet_cell_and_file_byte_limits(tmp_path):
    hostile.write_good_parquet(tmp_path / "ok.parquet", 3, seed=3)
    cells = items_of(tmp_path, "ok.parquet", "parquet", max_item_bytes=10)
    assert [k for _, k, _ in kinds(cells)] == ["too_large"] * 3
    whole = items_of(tmp_path, "ok.parquet", "parquet", max_file_bytes=100)
    assert kinds(whole) == [("ok.parquet", "too_large", True)]


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    hostile.write_truncated_shard(tmp_path / "cut.tar", 4, seed=4)
    found = kinds(items_of(tmp_path, "cut.tar", "webdataset"))
    assert found[:3] == [(f"s{i:04d}", "", False) for i in range(3)]
    assert found[3] == ("s0003", "truncated", False)
    assert found[4] == ("cut.tar", "truncated", True) and len(found) == 5


def test_compressed_shard_is_refused_without_inflating_it(tmp_path):
    hostile.write_gzip_bomb_shard(tmp_path / "bomb.tar", megabytes=50)
    assert os.path.getsize(tmp_path / "bomb.tar") < 200_000
    (item,) = items_of(tmp_path, "bomb.tar", "webdataset")
    assert (item.error.kind, item.whole_file) == ("unsupported", True) and "gzip" in item.error.message


def test_shard_member_and_count_limits(tmp_path):
    hostile.write_good_shard(tmp_path / "ok.tar", 3, seed=5)
    members = kinds(items_of(tmp_path, "ok.tar", "webdataset", max_item_bytes=100))
    assert [k for _, k, _ in members] == ["too_large"] * 3
    counted = kinds(items_of(tmp_path, "ok.tar", "webdataset", max_members=4))
    assert counted == [("s0000", "", False), ("s0001", "", False), ("ok.tar", "too_large", True)]
    whole = kinds(items_of(tmp_path, "ok.tar", "webdataset", max_file_bytes=1000))
    assert whole == [("ok.tar", "too_large", True)]


def test_duplicate_member_is_recorded_and_the_first_is_used(tmp_path):
    hostile.write_duplicate_shard(tmp_path / "dup.tar", 3, seed=6)
    items = items_of(tmp_path, "dup.tar", "webdataset")
    assert kinds(items) == [("s0000", "", False), ("s0001", "", False), ("s0002", "", False),
                            ("s0000#duplicate1", "duplicate_member", False)]
    assert items[0].data == hostile.jpeg_bytes(6000)


def test_links_and_special_members_are_never_read(tmp_path):
    hostile.write_link_shard(tmp_path / "links.tar", 2, seed=7)
    found = kinds(items_of(tmp_path, "links.tar", "webdataset"))
    assert found == [("s0000", "", False), ("s0001", "", False), ("zero", "special_member", False),
                     ("pipe", "special_member", False)]


def test_empty_and_non_tar_files(tmp_path):
    (tmp_path / "empty.tar").write_bytes(hostile.tar_bytes([]))
    (tmp_path / "html.tar").write_bytes(b"<html>not a tar</html>" * 40)
    assert items_of(tmp_path, "empty.tar", "webdataset") == []
    assert kinds(items_of(tmp_path, "html.tar", "webdataset")) == [("html.tar", "corrupt", True)]


def test_local_listing_skips_links_and_special_files_and_counts_them(tmp_path):
    hostile.write_good_shard(tmp_path / "real.tar", 1, seed=8)
    os.symlink("/dev/zero", tmp_path / "zero.tar")
    os.symlink(tmp_path, tmp_path / "loop")  # a folder link back up: must not be walked
    os.mkfifo(tmp_path / "pipe.tar")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "shard.tar.gz").write_bytes(b"x")
    names, skipped = scan_inputs(str(tmp_path), {}, "webdataset")
    assert names == ["real.tar"]
    assert skipped == {"link": 2, "special_file": 1, "extension .txt": 1, "extension .gz": 1}


def test_a_linked_source_root_is_listed_but_links_inside_it_are_not_walked(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    hostile.write_good_shard(tmp_path / "data" / "sub" / "real.tar", 1, seed=8)
    os.symlink(tmp_path / "data", tmp_path / "linked")
    os.symlink(tmp_path / "data" / "sub", tmp_path / "data" / "sub-link")
    names, skipped = scan_inputs(str(tmp_path / "linked"), {}, "webdataset")
    assert names == ["sub/real.tar"] and skipped == {"link": 1}


def test_s3_keys_that_would_collide_on_output_are_skipped_and_counted():
    from s3server import make_bucket, moto_s3

    with moto_s3() as s3:
        make_bucket(s3, "keys")
        for key in ("a/b.jpg", "a//b.jpg", "a/./b.jpg", "c.jpg"):
            storage.write_bytes(f"s3://keys/src/{key}", b"x", s3)
        names, skipped = scan_inputs("s3://keys/src", s3, "images")
        as_folder = storage.list_dir("s3://keys/src/c.jpg", s3)  # s3fs answers a file key with itself
    assert names == ["a/b.jpg", "c.jpg"] and skipped == {"unsafe_name": 2} and as_folder == ([], [], {})


def _flaky(monkeypatch, failures: int, error: Exception):
    """The first `failures` reads (whole-file or streaming opens) raise `error`."""
    calls = {"n": 0}
    real_read, real_open = storage.read_bytes, storage.open_for_read

    def flaky(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] <= failures:
                raise error
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(storage, "read_bytes", flaky(real_read))
    monkeypatch.setattr(storage, "open_for_read", flaky(real_open))
    return calls


def test_transient_errors_are_retried_with_backoff(tmp_path, monkeypatch):
    hostile.write_good_shard(tmp_path / "ok.tar", 2, seed=9)
    calls = _flaky(monkeypatch, 2, OSError(errno.EBUSY, "SlowDown"))  # what s3fs raises for a 503
    assert kinds(items_of(tmp_path, "ok.tar", "webdataset", retry_backoff_s=0.01)) == [
        ("s0000", "", False), ("s0001", "", False)]
    assert calls["n"] == 3


def test_transient_errors_that_outlast_the_retries_leave_the_item_unavailable(tmp_path, monkeypatch):
    hostile.write_good_parquet(tmp_path / "ok.parquet", 2, seed=10)
    calls = _flaky(monkeypatch, 100, OSError(errno.EBUSY, "SlowDown"))
    (item,) = items_of(tmp_path, "ok.parquet", "parquet", read_attempts=3, retry_backoff_s=0.01)
    assert (item.error.kind, item.whole_file, calls["n"]) == (UNAVAILABLE, True, 3)


def test_definite_answers_are_final_at_once(tmp_path, monkeypatch):
    calls = _flaky(monkeypatch, 100, FileNotFoundError("gone"))
    (item,) = items_of(tmp_path, "gone.jpg", "images", retry_backoff_s=0.01)
    assert (item.error.kind, calls["n"]) == ("missing", 1)


def test_unavailable_partition_is_not_written(tmp_path, monkeypatch):
    """A partition with a transiently unreadable item writes nothing: no outputs, no manifest."""
    import numpy as np

    from curation.pipeline.plan import RunDirectory
    from curation.pipeline.write import write_partition

    (tmp_path / "src").mkdir()
    hostile.write_good_parquet(tmp_path / "src" / "ok.parquet", 2, seed=11)
    source = SourceConfig(uri=str(tmp_path / "src"), format="parquet", read_attempts=2, retry_backoff_s=0.01)
    partition = Partition("p1", "parquet", ("ok.parquet",))
    _flaky(monkeypatch, 100, TimeoutError("read timed out"))
    (columns,) = decode_partition(partition, source, 16)
    columns |= {"decision": np.array(["failed"], object), "fired": np.array([""], object),
                "embedding": np.zeros((1, 4), np.float32), "score_x": np.array([np.nan], np.float32)}
    run = RunDirectory(str(tmp_path / "out"), "r")
    result = write_partition(run, partition, columns, source, ["x"], True)
    assert result["partition"] == "p1" and "unavailable" in result["unfinished"]
    assert not (tmp_path / "out").exists()


def test_a_shard_is_decoded_in_bounded_blocks_that_cover_it_exactly_once(tmp_path):
    """A large shard is streamed, never one block of pixels: blocks of at most `block_items` items,
    positions 0..n-1 once each in order, the last block's rows carrying the shard's total."""
    hostile.write_good_shard(tmp_path / "big.tar", 23, seed=5)
    source = SourceConfig(uri=str(tmp_path), format="webdataset")
    blocks = list(decode_partition(Partition("p", "webdataset", ("big.tar",)), source, 16, block_items=5))
    assert [len(b["id"]) for b in blocks] == [5, 5, 5, 5, 3]
    assert all(b["pixels"].shape[0] == len(b["id"]) <= 5 for b in blocks)
    positions = np.concatenate([b["position"] for b in blocks])
    assert positions.tolist() == list(range(23))
    assert all((b["n_items"] == -1).all() for b in blocks[:-1]) and (blocks[-1]["n_items"] == 23).all()
    whole = list(decode_partition(Partition("p", "webdataset", ("big.tar",)), source, 16, block_items=100))
    assert len(whole) == 1 and np.array_equal(whole[0]["pixels"], np.concatenate([b["pixels"] for b in blocks]))
    (empty,) = decode_partition(Partition("e", "images", ()), source, 16)
    assert len(empty["id"]) == 0 and empty["pixels"].shape == (0, 16, 16, 3)


def test_a_shard_is_read_one_sample_at_a_time(tmp_path):
    """The reader streams: no read of the shard whole, and after the first sample it has read
    little more than that sample."""
    from curation.pipeline.read import iter_shard

    hostile.write_good_shard(tmp_path / "big.tar", 40, seed=12)
    size = os.path.getsize(tmp_path / "big.tar")
    reads = []

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            data = self.handle.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.handle, name)

    with open(tmp_path / "big.tar", "rb") as raw:
        handle = Recording(raw)
        entries = iter_shard(handle, SourceConfig(uri=str(tmp_path), format="webdataset"))
        first = next(entries)
        assert first.key == "s0000" and raw.tell() < size / 10
        rest = list(entries)
    assert [e.key for e in rest] == [f"s{i:04d}" for i in range(1, 40)]
    assert max(reads) < size / 10  # never the whole shard in one read


def test_a_webdataset_partition_is_split_by_streaming_the_shard_again(tmp_path):
    import tarfile

    from curation.pipeline.plan import RunDirectory
    from curation.pipeline.write import write_partition

    (tmp_path / "src").mkdir()
    hostile.write_good_shard(tmp_path / "src" / "s.tar", 4, seed=13)
    source = SourceConfig(uri=str(tmp_path / "src"), format="webdataset")
    partition = Partition("p1", "webdataset", ("s.tar",))
    (columns,) = decode_partition(partition, source, 16)
    columns |= {"decision": np.array(["keep", "remove", "keep", "remove"], object),
                "fired": np.array(["", "x", "", "x"], object), "embedding": np.zeros((4, 4), np.float32),
                "score_x": np.array([0.1, 0.9, 0.2, 0.8], np.float32)}
    counts = write_partition(RunDirectory(str(tmp_path / "out"), "r"), partition, columns, source, ["x"], False)
    assert (counts["kept"], counts["removed"]) == (2, 2)
    for folder, keys in (("kept", ["s0000", "s0002"]), ("removed", ["s0001", "s0003"])):
        with tarfile.open(tmp_path / "out" / "r" / folder / "s.tar") as tar:
            names = tar.getnames()
        assert sorted({n.split(".")[0] for n in names}) == keys and len(names) == 2 * len(keys)


class _Recording:
    """A file handle that records each read's size and can fail like a store after `fail_after` bytes."""

    def __init__(self, handle, fail_after: int | None = None):
        self.handle, self.fail_after, self.reads, self.total = handle, fail_after, [], 0

    def read(self, n=-1):
        if self.fail_after is not None and self.total >= self.fail_after:
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        data = self.handle.read(n)
        self.reads.append(len(data))
        self.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _recorded_opens(monkeypatch, fail_after=None) -> list:
    opened, real = [], storage.open_for_read

    def open_for_read(uri, options=None):
        handle, size = real(uri, options)
        opened.append(_Recording(handle, fail_after))
        return opened[-1], size

    monkeypatch.setattr(storage, "open_for_read", open_for_read)
    return opened


def test_a_parquet_file_is_read_a_record_batch_at_a_time(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    table = pq.read_table(io_bytes(hostile.parquet_bytes(600, seed=14)))
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)
    size = os.path.getsize(tmp_path / "big.parquet")
    opened = _recorded_opens(monkeypatch)
    items = items_of(tmp_path, "big.parquet", "parquet")
    assert [item.id for item in items] == [f"p14-{i}" for i in range(600)] and not any(i.error for i in items)
    assert max(opened[0].reads) < size / 3  # a row group at a time, never the file


def test_a_store_failing_mid_stream_leaves_the_file_unavailable(tmp_path, monkeypatch):
    hostile.write_good_shard(tmp_path / "s.tar", 30, seed=15)
    (tmp_path / "p.parquet").write_bytes(hostile.parquet_bytes(30, seed=16))
    _recorded_opens(monkeypatch, fail_after=20_000)
    shard = items_of(tmp_path, "s.tar", "webdataset")
    assert 0 < len(shard) < 31 and (shard[-1].error.kind, shard[-1].whole_file) == (UNAVAILABLE, True)
    assert "Connection reset" in shard[-1].error.message
    table = items_of(tmp_path, "p.parquet", "parquet")
    assert (table[-1].error.kind, table[-1].whole_file) == (UNAVAILABLE, True)


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_a_parquet_file_damaged_part_way_keeps_its_decided_rows_and_finishes(tmp_path):
    """Rows before a damaged row group are decided and copied; the rest is one whole-file failed
    row; the writer stops where decoding did instead of leaving the file unfinished forever."""
    import pyarrow.parquet as pq

    from curation.pipeline.plan import RunDirectory
    from curation.pipeline.write import write_partition

    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "cut.parquet"
    pq.write_table(pq.read_table(io_bytes(hostile.parquet_bytes(768, seed=17))), path, row_group_size=256)
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(1)  # the image column of the last row group
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset:chunk.data_page_offset + 16] = b"\xff" * 16  # the page header
    path.write_bytes(bytes(data))
    source = SourceConfig(uri=str(tmp_path / "src"), format="parquet")
    partition = Partition("p", "parquet", ("cut.parquet",))
    items = list(iter_raw_items(partition, source))
    assert len(items) == 513 and not any(i.error for i in items[:512])
    assert (items[-1].error.kind, items[-1].whole_file) == ("truncated", True)
    blocks = list(decode_partition(partition, source, 16))
    columns = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    n = len(columns["id"])
    decided = np.where(np.arange(n) < 512, np.where(np.arange(n) % 2 == 0, "keep", "remove"), "failed")
    columns |= {"decision": decided.astype(object), "fired": np.array([""] * n, object),
                "embedding": np.zeros((n, 4), np.float32), "score_x": np.zeros(n, np.float32)}
    counts = write_partition(RunDirectory(str(tmp_path / "out"), "r"), partition, columns, source, ["x"], False)
    assert (counts["kept"], counts["removed"], counts["failed_files"]) == (256, 256, 1)
    kept = pq.read_table(tmp_path / "out" / "r" / "kept" / "cut.parquet")
    assert kept.num_rows == 256 and kept.column("id").to_pylist()[:2] == ["p17-0", "p17-2"]
