"""curation.secrets: the one redaction family used by storage, tracking, workflow and the CLI."""

import logging
import subprocess
import sys

import pytest

from curation import secrets, storage, tracking, workflow
from curation.secrets import MARKER, redact, redact_text, secret_values

PASSWORD = "s3cr3t-pw"


@pytest.mark.parametrize("text, expected", [
    (f"http://alice:{PASSWORD}@host:5000", "http://alice:***@host:5000"),
    (f"s3://AKIAEXAMPLE:wJal/rXUtn{PASSWORD}@bucket/x", "s3://AKIAEXAMPLE:***@bucket/x"),  # '/' in a secret
    (f"http://alice:p@ss{PASSWORD}@host/a@b", "http://alice:***@host/a@b"),  # unencoded '@'
    (f"https://{PASSWORD}@github.com/o/r.git", "https://***@github.com/o/r.git"),  # bare token
    (f"postgresql://:{PASSWORD}@db/mlflow", "postgresql://:***@db/mlflow"),
    (f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA&X-Amz-Signature={PASSWORD}&versionId=3",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&versionId=3"),
    (f"failed: GET https://h/p?password={PASSWORD}&token={PASSWORD}#top: refused",
     "failed: GET https://h/p?password=***&token=***#top: refused"),
    (f"https://acct.blob.core.windows.net/c?sv=2022&sig={PASSWORD}",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***"),
])
def test_redact_text_masks_uri_credentials(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", ["sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000/api?max_results=1",
                                  "s3://bucket/a/b.parquet", "./out/run", "https://reg/@scope/pkg",
                                  "email bob@example.com about http://host/x"])
def test_redact_text_leaves_plain_uris_alone(text):
    assert redact_text(text) == text


def test_redact_text_masks_given_values_longest_first():
    assert redact_text("key AKIA1 secret AKIA1xyz", ["AKIA1", "AKIA1xyz", "", None]) == "key *** secret ***"


def test_redact_masks_secret_keys_and_uri_strings_at_every_depth():
    options = {"endpoint_url": "http://h:1", "key": "AKIA", "secret": "s3cr3t", "token": "t", "anon": False,
               "client_kwargs": {"aws_secret_access_key": "x", "aws_access_key_id": "y", "region_name": "r"},
               "config_kwargs": {"connect_timeout": 5}, "password": "p", "session_token": "st", "unset_key": None}
    cfg = {"tracking": {"uri": f"http://u:{PASSWORD}@mlflow:5000"}, "source": {"storage_options": options},
           "detectors": [{"name": "monkey", "task_texts": [f"s3://k:{PASSWORD}@b"]}], "shape": (1, "x")}
    redacted = redact(cfg)
    assert redacted["source"]["storage_options"] == {
        "endpoint_url": "http://h:1", "key": MARKER, "secret": MARKER, "token": MARKER, "anon": False,
        "client_kwargs": {"aws_secret_access_key": MARKER, "aws_access_key_id": MARKER, "region_name": "r"},
        "config_kwargs": {"connect_timeout": 5}, "password": MARKER, "session_token": MARKER, "unset_key": None}
    assert redacted["tracking"]["uri"] == "http://u:***@mlflow:5000"
    assert redacted["detectors"] == [{"name": "monkey", "task_texts": ["s3://k:***@b"]}]
    assert redacted["shape"] == (1, "x")
    assert options["key"] == "AKIA" and cfg["tracking"]["uri"].endswith("@mlflow:5000")  # a copy


def test_redact_without_keys_keeps_user_chosen_names():
    summary = {"thresholds": {"monkey": {"threshold": 0.5}}, "run_dir": f"s3://k:{PASSWORD}@b/run"}
    assert redact(summary, keys=False) == {"thresholds": {"monkey": {"threshold": 0.5}}, "run_dir": "s3://k:***@b/run"}
    assert redact(summary)["thresholds"] == {"monkey": MARKER}  # why summary.json uses keys=False


def test_secret_values_collects_strings_under_secret_keys():
    assert secret_values({"key": "K", "anon": True, "c": {"aws_session_token": "T"}, "l": [{"password": "P"}],
                          "endpoint_url": "http://e", "token": None}) == ["K", "T", "P"]


def test_redact_filter_cleans_messages_and_tracebacks(caplog):
    logger = logging.getLogger("curation.test_secrets")
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    handler.addFilter(secrets.RedactFilter())
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"API request to http://u:{PASSWORD}@h:1/api failed")
        except RuntimeError:
            logger.exception("tracking at %s failed", f"http://u:{PASSWORD}@h:1")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.getMessage() == "tracking at http://u:***@h:1 failed"
    assert "u:***@h:1/api" in record.exc_text and PASSWORD not in record.exc_text


def test_one_redaction_family():
    """storage, tracking and workflow use curation.secrets; no module keeps its own word list."""
    for module in (storage, tracking, workflow):
        leftovers = {"REDACTED", "_SECRET_WORDS", "_NOT_SECRET", "_scrub", "_redact_params", "_is_secret_key",
                     "_is_secret"} & set(vars(module))
        assert not leftovers, (module.__name__, leftovers)
    assert not hasattr(storage, "redact")


def test_import_is_light():
    code = "import sys, curation.secrets; assert set(sys.modules) & {'numpy', 'requests', 'mlflow'} == set()"
    subprocess.run([sys.executable, "-c", code], check=True)
