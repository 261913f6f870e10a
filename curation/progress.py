"""Progress of long steps: a bar on a terminal, periodic log lines everywhere else.

Fitting a detector encodes tens of thousands of WordNet candidates, evaluation encodes a 280k-word
corpus, a stream decodes and embeds every image: minutes each. With no output a user cannot tell
a long step from a hang, so every such step reports through `Progress`:

- stderr is a terminal: a tqdm bar (done/total, rate, time left, step-specific extras).
- otherwise (cron log, pipe, Ray worker): INFO lines on the `curation.progress` logger, a first
  one when the step starts (or once it has run `delay_s`), then one every `interval_s` from a
  timer thread whether or not the work advanced (a line that says "no update for 40 s" is how a
  stall shows), and a final one with the total, the time taken and the rate.

Ray runs tasks and actors in worker processes whose Python logging nobody configured (INFO lines
would be dropped); `ensure_worker_logging` gives the `curation` logger a stderr handler there,
once per process, and Ray forwards worker stderr to the driver. `configure_logging` is the
command-line setup: format, credential redaction, third-party noise turned down.

`CURATION_PROGRESS_INTERVAL_S` and `CURATION_PROGRESS_DELAY_S` override the defaults (a cron job
may want a line a minute; tests want every line at once).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from typing import Any, TextIO

log = logging.getLogger("curation.progress")

DEFAULT_INTERVAL_S = 5.0  # never a 10 s silence while a step runs
DEFAULT_DELAY_S = 2.0  # steps shorter than this print nothing: a 9-prompt encode is not news
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Libraries whose INFO lines say nothing a user can act on (a font cache was built, a sqlite
# MLflow store was created and migrated): warnings and errors still show.
QUIET_LOGGERS = ("matplotlib", "PIL", "alembic", "filelock", "urllib3", "botocore", "fsspec", "s3fs",
                 "httpx", "numexpr", "mlflow.store.db.utils")


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number of seconds, e.g. {name}={default:g}") from None
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(f"{name}={value!r}: must be >= 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """12.3 s, 4 min 36 s, 1 h 05 min: short enough for a progress line."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_rate(per_second: float) -> str:
    """Three significant digits or so, never an exponent: 1234, 56.7, 0.89."""
    if per_second >= 100:
        return f"{per_second:.0f}"
    return f"{per_second:.1f}" if per_second >= 10 else f"{per_second:.2f}"


def _format_value(value: Any) -> str:
    """Numbers compactly (a loss as 4 significant digits); tensors and numpy scalars as numbers."""
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else f"{number:.4g}"


def format_extras(extras: dict[str, Any]) -> str:
    """`cached_shards_skipped=2, loss=0.6931` -> "cached shards skipped 2, loss 0.6931"."""
    return ", ".join(f"{key.replace('_', ' ')} {_format_value(value)}" for key, value in extras.items())


class Progress:
    """Reports one long step: `update(n, **extras)` after each unit of work, `close()` at the end
    (or use it as a context manager: an exception ends it as "stopped" instead of "done").

    `total` None means unknown (the lines then show the count, rate and elapsed time). Updates are
    cheap (a counter under a lock): call it per batch or per optimiser step. Extras are formatted
    only when a line is printed, so a loss tensor can be passed without a device sync per step.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "items", *,
                 interval_s: float | None = None, delay_s: float | None = None, stream: TextIO | None = None,
                 **extras: Any):
        self.what, self.total, self.unit = what, total, unit
        self.interval_s = interval_s if interval_s is not None else _env_seconds(
            "CURATION_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S)
        self.delay_s = delay_s if delay_s is not None else _env_seconds("CURATION_PROGRESS_DELAY_S", DEFAULT_DELAY_S)
        self.done, self.extras = 0, dict(extras)
        self._lines = 0  # log lines written (non-terminal mode)
        self._started = self._last_update = time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()
        ensure_worker_logging()
        stream = stream if stream is not None else sys.stderr
        self._bar = _bar(what, total, unit, stream, self.delay_s) if _isatty(stream) else None
        if self._bar is None and self.delay_s <= 0:
            self._emit(self._start_line())
        self._thread = threading.Thread(target=self._tick, name=f"progress: {what}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def update(self, n: int = 1, **extras: Any) -> None:
        """`n` more units done; `extras` replace the step's extra fields (loss, kept, ...)."""
        with self._lock:
            self.done += n
            self.extras.update(extras)
            self._last_update = time.monotonic()
            if self._bar is not None:
                self._bar.update(n)

    def set_total(self, total: int | None) -> None:
        """For a step whose length becomes known (or changes) while it runs."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def close(self, ok: bool = True) -> None:
        """The final line (only if a line was printed: a step shorter than `delay_s` stays silent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self._bar is not None:
                self._set_postfix()
                self._bar.close()
            elif self._lines:
                self._emit(self._final_line(ok))

    # -- lines ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Timer thread: the first line after `delay_s`, then one every `interval_s` (a refresh of
        the bar on a terminal, so its clock runs while a slow batch is in flight)."""
        period = min(1.0, self.interval_s / 2) if self._bar is None else 1.0
        last_line = None
        while not self._stop.wait(max(period, 0.01)):
            now = time.monotonic()
            with self._lock:
                if self._stop.is_set() or now - self._started < self.delay_s:
                    continue
                if self._bar is not None:
                    self._set_postfix()
                    self._bar.refresh()
                elif not self._lines:
                    self._emit(self._start_line() if self.done == 0 else self._status_line(now))
                    last_line = now
                elif now - (last_line or self._started) >= self.interval_s:
                    self._emit(self._status_line(now))
                    last_line = now

    def _set_postfix(self) -> None:
        if self.extras:
            self._bar.set_postfix({k.replace("_", " "): _format_value(v) for k, v in self.extras.items()},
                                  refresh=False)

    def _emit(self, line: str) -> None:
        log.info("%s", line)
        self._lines += 1

    def _tail(self) -> str:
        return f", {format_extras(self.extras)}" if self.extras else ""

    def _start_line(self) -> str:
        todo = f" ({self.total} {self.unit} to do)" if self.total is not None else ""
        return f"{self.what}: started{todo}{self._tail()}"

    def _status_line(self, now: float) -> str:
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        speed = f", {format_rate(rate)} {self.unit}/s" if rate else ""  # no rate before the first unit
        if self.total is not None:
            percent = 100.0 * self.done / self.total if self.total else 100.0
            left = f", {format_duration((self.total - self.done) / rate)} left" if rate else ""
            head = f"{self.done}/{self.total} {self.unit} ({percent:.0f}%){speed}{left}"
        else:
            head = f"{self.done} {self.unit}{speed}, {format_duration(elapsed)} elapsed"
        stalled = now - self._last_update
        stall = f", no update for {format_duration(stalled)}" if stalled >= self.interval_s else ""
        return f"{self.what}: {head}{stall}{self._tail()}"

    def _final_line(self, ok: bool) -> str:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None and (not ok or self.done != self.total) else ""
        verb = "done" if ok else "stopped"
        return (f"{self.what}: {verb}, {self.done}{of} {self.unit} in {format_duration(elapsed)} "
                f"({format_rate(rate)} {self.unit}/s){self._tail()}")


class Waiting(Progress):
    """A long step with nothing to count (a model loading): its lines say how long it has run."""

    def __init__(self, what: str, **options: Any):
        super().__init__(what, None, "s", **options)

    def _start_line(self) -> str:
        return f"{self.what}: started"

    def _status_line(self, now: float) -> str:
        return f"{self.what}: {format_duration(now - self._started)} elapsed"

    def _final_line(self, ok: bool) -> str:
        return f"{self.what}: {'done' if ok else 'stopped'} in {format_duration(time.monotonic() - self._started)}"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def _bar(what: str, total: int | None, unit: str, stream: TextIO, delay_s: float):
    from tqdm import tqdm

    # width read once: dynamic_ncols would print nothing at all on a terminal that reports 0 columns
    return tqdm(total=total, desc=what, unit=f" {unit}", file=stream, delay=delay_s, mininterval=0.5, smoothing=0.1)


# -- logging setup -----------------------------------------------------------------------------
def configure_logging(level: int = logging.INFO) -> None:
    """The command line's logging: INFO lines with time and logger on stderr, credentials redacted,
    third-party INFO noise turned down. Progress lines from Ray workers are never deduplicated by
    Ray's log monitor (it folds lines that differ only in numbers, i.e. two shards' progress)."""
    from curation import secrets

    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"curation\.progress")  # read when ray is imported
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(secrets.RedactFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def ensure_worker_logging() -> None:
    """In a Ray worker process, give the `curation` logger a stderr handler (once): Ray forwards
    worker stderr to the driver, but a worker's logging is unconfigured, so INFO lines would be
    dropped. A driver is left alone: it configured its own logging (or chose not to), and a second
    handler there would print every line twice."""
    logger = logging.getLogger("curation")
    if getattr(logger, "_curation_worker_handler", False) or not _in_ray_worker():
        return
    from curation import secrets

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(secrets.RedactFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a library's bare `logging.warning` may give the root a handler later
    logger._curation_worker_handler = True


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")  # a worker has imported ray; a process without it is no worker
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE
