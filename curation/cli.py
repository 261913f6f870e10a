"""`curation` console command: a thin shell over `curation.workflow`.

    curation curate   --config configs/demo.yaml [--set key=value ...]
    curation train    --config ...      fit detectors only
    curation rescore  --scores <run dir> --config ...
    curation evaluate --config ... --set evaluation.wanted_uri=... --set evaluation.unwanted_uri=...
    curation promote  --detector <registered name> --version N --alias production [--config ...]
    curation report   --run <run dir> [--config ...]   rebuild a finished run's audit report
    curation demo     build the offline demo data and run curate on it

Exit status: 0 done; 1 failed, or MLflow tracking failed after the outputs were complete, or
partitions were left unfinished by transient read errors (summary.json says which; run again);
2 config error. Errors and log lines are printed with credentials redacted.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("curate", "filter a dataset: kept/, removed/, scores/, failed/"),
                            ("train", "fit the configured detectors (text only) and log them"),
                            ("rescore", "apply detectors/thresholds to a previous run's stored embeddings"),
                            ("evaluate", "AUROC / FPR@95 on labelled wanted and unwanted images"),
                            ("promote", "point an alias of a registered detector (e.g. production) at a version"),
                            ("report", "rebuild the audit report (report/index.html) of a finished run; no embedding"),
                            ("demo", "offline demo: build demo data, run curate on the embedded defaults")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", default=None if name != "demo" else "configs/demo.yaml",
                             help="YAML run config (see configs/)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override any config field, e.g. --set source.uri=s3://bucket/prefix")
        if name == "rescore":
            command.add_argument("--scores", required=True, help="run directory of a previous curate run")
        if name == "report":
            command.add_argument("--run", required=True, help="run directory of a finished curate or rescore run; "
                                 "the source and its options come from its _config.json unless --config/--set")
        if name == "promote":
            command.add_argument("--detector", required=True, help="registered model name, as `train` printed it")
            command.add_argument("--version", required=True, type=int, help="version to point the alias at")
            command.add_argument("--alias", required=True, help="e.g. production (configs use models:/<name>@<alias>)")
    return parser


def report(summary: dict) -> int:
    """Print the summary; exit code 1 when MLflow tracking failed (the outputs are complete then,
    and summary.json says why) or when partitions were left for the next run, else 0."""
    from curation.report import summary_text

    print(summary_text(summary))
    if summary.get("skipped"):
        print(f"skipped source entries (not inputs): {summary['skipped']}")
    failed = summary.get("tracking", {}).get("status") == "failed"
    if failed:
        print(f"MLflow tracking failed: {summary['tracking']['error']}\nThe outputs in {summary['run_dir']} "
              "are complete; summary.json records the failure.", file=sys.stderr)
    unfinished = summary.get("unfinished") or []
    if unfinished:
        print(f"{len(unfinished)} partitions left unfinished (transient errors), e.g. {unfinished[0]['reason']}\n"
              "Run the same command again to finish them; summary.json lists them.", file=sys.stderr)
    return 1 if failed or unfinished else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from curation.progress import configure_logging

    configure_logging()  # before Ray is imported: it reads its log settings then
    from curation import secrets, workflow
    from curation.config import ConfigError, load_config

    try:
        if args.command == "demo":
            from curation.demo import run_demo

            return run_demo(args.config, args.overrides)
        cfg = None if args.command == "report" else load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {secrets.redact_text(str(err))}", file=sys.stderr)
        return 2
    try:
        if args.command == "curate":
            return report(workflow.curate(cfg))
        if args.command == "rescore":
            return report(workflow.rescore(cfg, args.scores))
        if args.command == "train":
            print(json.dumps(workflow.train(cfg), indent=2, default=str))
        elif args.command == "report":
            from curation.report import rebuild

            print(json.dumps(rebuild(args.run, args.config, args.overrides), indent=2))
        elif args.command == "promote":
            from curation import registry

            print(json.dumps(registry.promote(cfg, args.detector, args.version, args.alias), indent=2))
        else:
            print(json.dumps(workflow.evaluate(cfg), indent=2))
    except ConfigError as err:  # `report` reads its config (--config/--set or the run's record) here
        print(f"config error: {secrets.redact_text(str(err))}", file=sys.stderr)
        return 2
    except _explained_errors() as err:
        print(f"curation {args.command}: {type(err).__name__}: {secrets.redact_text(str(err))}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - printed like Python would, minus any credentials
        print(secrets.redact_text("".join(traceback.format_exception(err))), file=sys.stderr)
        return 1
    return 0


def _explained_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says what happened and what to do: one line, no traceback."""
    from curation.pipeline.lease import RunLockedError
    from curation.pipeline.plan import OutputConflictError
    from curation.registry import RegistryError
    from curation.report import NotARunError
    from curation.storage import StorageUnreachableError
    from curation.tracking import TrackingUnreachableError
    from curation.preflight import ClusterPathError, JobPathError
    from curation.thresholds import CalibrationError
    from curation.workflow import NoInputsError

    return (RunLockedError, OutputConflictError, StorageUnreachableError, TrackingUnreachableError,
            CalibrationError, ClusterPathError, JobPathError, NoInputsError, RegistryError,
            NotARunError)


if __name__ == "__main__":
    sys.exit(main())
