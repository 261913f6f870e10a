"""Silent gaps: the longest stretch with no output line, as a user watching a piped log sees it.

Runs each command with stdout and stderr piped (a cron job's or CI's view: no terminal, so progress
comes as log lines), timestamps every line as it arrives, and records the longest gaps between
lines (with the lines around them), the total time and the line count. Each command runs in a
fresh working directory with a fresh, empty cache (`CURATION_CACHE`): cold, like a new clone.

    python benchmarks/silent_gaps.py [--only demo|evaluate] [--timeout-min 25]

- demo: `curation demo` (renders the demo data, curates it in three formats).
- evaluate: `python -m curation.emoji.evaluate` (README, "The offline default"): `curation evaluate`'s
  `workflow.evaluate` on both demo tasks, trained and held-out splits. If the cold run exceeds
  `--timeout-min`, it is stopped (its gaps so far are kept) and run again with the text-embedding
  cache it filled (word lists encoded) but no fitted detectors: "warm for the word lists only".

Writes benchmarks/results/silent_gaps.json: per run the git commit (and whether the tree had
uncommitted changes), the machine's load average before and after (1, 5, 15 min: on this 2-core
machine, above ~2 means other work shared the CPUs), the gaps; runs of other commands kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import RESULTS, write

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOP_GAPS = 5


def _pump(stream, name: str, lines: list, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        with lock:
            lines.append((time.monotonic(), name, raw.decode(errors="replace").rstrip("\n")))


def timed_lines(command: list[str], cwd: Path, env: dict, timeout_s: float) -> dict:
    """Run `command`; every output line with its arrival time, the exit code, whether it timed out."""
    lines: list[tuple[float, str, str]] = []
    lock = threading.Lock()
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    pumps = [threading.Thread(target=_pump, args=(stream, name, lines, lock), daemon=True)
             for stream, name in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for pump in pumps:
        pump.start()
    try:
        code, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)  # the whole session: the CLI and the Ray it started
        code, timed_out = proc.wait(timeout=60), True
    for pump in pumps:
        pump.join(timeout=30)
    end = time.monotonic()
    return {"lines": sorted(lines), "start": start, "end": end, "returncode": code, "timed_out": timed_out}


def gap_report(run: dict) -> dict:
    """Longest gaps between consecutive lines (start and end of the run count as lines)."""
    stamps = [(run["start"], "(start)")] + [(t, text) for t, _, text in run["lines"]] + [(run["end"], "(exit)")]
    gaps = sorted(((b[0] - a[0], a[1], b[1]) for a, b in zip(stamps, stamps[1:])), reverse=True)[:TOP_GAPS]
    return {"total_s": round(run["end"] - run["start"], 1), "lines": len(run["lines"]),
            "returncode": run["returncode"], "timed_out": run["timed_out"],
            "longest_gap_s": round(gaps[0][0], 2) if gaps else 0.0,
            "longest_gaps": [{"gap_s": round(g, 2), "after": a[:300], "before": b[:300]} for g, a, b in gaps],
            "gaps_over_10s": sum(1 for a, b in zip(stamps, stamps[1:]) if b[0] - a[0] > 10)}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(name: str, command: list[str], cwd: Path, cache: Path, timeout_s: float, log_dir: Path) -> dict:
    env = {**os.environ, "CURATION_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    load_before, started_at = load(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run = timed_lines(command, cwd, env, timeout_s)
    (log_dir / f"{name}.log").write_text("".join(f"{t - run['start']:9.2f} {stream} {text}\n"
                                                 for t, stream, text in run["lines"]))
    report = {"command": " ".join(command), "started_at": started_at, "git": git_commit(),
              "load_before": load_before, "load_after": load(), **gap_report(run)}
    print(f"{name}: {report['total_s']} s, {report['lines']} lines, longest gap {report['longest_gap_s']} s",
          file=sys.stderr)
    return report


def previous_runs() -> dict:
    """Runs recorded by an earlier invocation (`--only` measures one command and keeps the other's)."""
    path = RESULTS / "silent_gaps.json"
    return json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}


def git_commit() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"commit": head, "uncommitted_changes": bool(dirty)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("demo", "evaluate"))
    parser.add_argument("--timeout-min", type=float, default=25.0, help="cold evaluate longer than this: warm rerun")
    parser.add_argument("--keep", type=Path, help="keep the working directories and logs here")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="silent-gaps-"))
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.only in (None, "demo"):
        work = root / "demo"
        work.mkdir()
        runs["demo_cold"] = measure("demo_cold", [str(BIN / "curation"), "demo", "--config",
                                                  str(REPO / "configs/demo.yaml")],
                                    work, work / "cache", 3600, logs)
    if args.only in (None, "evaluate"):
        work = root / "evaluate"
        work.mkdir()
        command = [str(BIN / "python"), "-m", "curation.emoji.evaluate", "--out", str(work / "eval"),
                   "--n-per-emoji", "2", "--limit", "400", "--min-images", "60"]
        cold = measure("evaluate_cold", command, work, work / "cache", args.timeout_min * 60, logs)
        runs["evaluate_cold"] = cold
        if cold["timed_out"]:
            shutil.rmtree(work / "cache" / "detectors", ignore_errors=True)  # keep the word-list embeddings only
            shutil.rmtree(work / "eval", ignore_errors=True)
            runs["evaluate_warm_word_lists"] = measure("evaluate_warm_word_lists", command, work, work / "cache",
                                                       3600, logs)
    write("silent_gaps", {"target_max_gap_s": 10, "runs": {**previous_runs(), **runs}})
    if not args.keep:
        shutil.rmtree(root / "demo", ignore_errors=True)
        shutil.rmtree(root / "evaluate", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
