"""What counts as a secret, and how it is hidden, in one place: logs, MLflow params and tags,
`_config.json`, summary.json and error messages all go through `redact` / `redact_text`.

Two kinds of secret: the value of a secret-looking key (`storage_options.secret`,
`aws_session_token`, `password` ...) and credentials inside a URI string, i.e. the password of
its userinfo (`http://alice:s3cr3t@host` -> `http://alice:***@host`; a bare token
`https://TOKEN@host` -> `https://***@host`) and secret query parameters (`?token=`,
`X-Amz-Signature=`, `sig=` ...). Everything is masked with the one marker "***".
Standard library only, so any module may import it.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

MARKER = "***"
_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "signature", "authorization")
_SECRET_NAMES = frozenset({"sig", "pw", "pwd", "auth"})  # too short to match as words
_NOT_SECRET = frozenset({"endpoint_url"})
# scheme://user:password@ or scheme://token@; like urllib, the userinfo ends at the LAST @ before
# any / ? # (an unencoded @ in a password must not leave its tail visible); failing that, at the
# first @ (AWS secrets hold `/`: better to over-mask `http://h:1/path@x` than to leak one)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^\s/?#@:]*)"
                       r"(?::(?P<password>[^\s/?#]*|[^\s?#]*?))?@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[^\s=&#;?]+)=)(?P<value>[^\s&#;]*)")


def is_secret_key(key: Any) -> bool:
    """Whether a key names a secret; for dotted keys (`source.storage_options.key`) the last part.
    Substring match, case-insensitive (`aws_secret_access_key`, `Password`); `endpoint_url` is not."""
    last = str(key).rsplit(".", 1)[-1].lower()
    return last not in _NOT_SECRET and (last in _SECRET_NAMES or any(word in last for word in _SECRET_WORDS))


def _mask_userinfo(match: re.Match) -> str:
    if match.group("password") is None:
        return f"{match.group('scheme')}{MARKER}@" if match.group("user") else match.group(0)
    return f"{match.group('scheme')}{match.group('user')}:{MARKER}@"


def _mask_query(match: re.Match) -> str:
    return match.group("lead") + MARKER if is_secret_key(match.group("name")) else match.group(0)


def redact_text(text: str, extra_values: Iterable[Any] = ()) -> str:
    """`text` (an error message, a log line, a URI) with URI passwords, secret query parameters and
    every non-empty string in `extra_values` (e.g. `secret_values(storage_options)`, which a
    library's error message may echo) replaced by "***"."""
    text = _QUERY_PARAM.sub(_mask_query, _USERINFO.sub(_mask_userinfo, str(text)))
    for value in sorted({v for v in extra_values if isinstance(v, str) and v}, key=len, reverse=True):
        text = text.replace(value, MARKER)
    return text


def redact(obj: Any, keys: bool = True) -> Any:
    """A copy of `obj` safe to log or record: recursively over dicts, lists and tuples, the value of
    every secret-looking key becomes "***" (None stays None: nothing was set), and every string
    goes through `redact_text`. `keys=False` masks strings only, for data whose keys are names
    chosen by users (summary.json: a detector called "monkey" is not a secret)."""
    if isinstance(obj, dict):
        return {k: MARKER if keys and v is not None and is_secret_key(k) else redact(v, keys)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, keys) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def secret_values(obj: Any) -> list[str]:
    """Every string held under a secret-looking key of `obj`, at any depth: the literal values a
    third-party error message might contain, for `redact_text(..., extra_values=...)`."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if is_secret_key(key) and isinstance(value, str):
                found.append(value)
            else:
                found += secret_values(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found += secret_values(value)
    return found


class RedactFilter(logging.Filter):
    """A logging filter for handlers (the CLI installs it): every record's message and traceback
    through `redact_text`, so library log lines (MLflow, urllib3, s3fs) cannot print a password."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True
