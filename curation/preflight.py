"""Checks a job makes before it reads or writes anything: paths that would vanish inside a Ray job,
local paths a multi-node cluster cannot share, an output that the source listing would curate.
Each refuses with what to change.
"""

from __future__ import annotations

from curation import secrets, storage, tracking
from curation.config import RunConfig
from curation.pipeline import ray_data
from curation.pipeline.plan import OutputConflictError


class JobPathError(ValueError):
    """A path that would resolve inside a Ray job's temporary working directory."""


def check_paths_for_ray_job(cfg: RunConfig) -> None:
    """Inside `ray job submit`, the entrypoint's working directory is a per-session copy under
    /tmp/ray/session_*/runtime_resources/ that vanishes with the session (and holds only what git
    does not ignore): relative local paths and the cwd-relative default MLflow store would read
    nothing or write where nobody finds it. Refuse them, naming the fix."""
    if not ray_data.in_ray_job():
        return
    paths = {"source.uri": cfg.source.uri, "output.uri": cfg.output.uri, "cache_dir": cfg.cache_dir,
             "evaluation.wanted_uri": cfg.evaluation.wanted_uri, "evaluation.unwanted_uri": cfg.evaluation.unwanted_uri}
    relative = [f"{name}={value!r}" for name, value in paths.items() if value and storage.is_relative(value)]
    if relative:
        raise JobPathError(f"inside a Ray job, relative paths resolve in the job's temporary working directory: "
                           f"{', '.join(relative)}. Use absolute paths on storage every node shares, or s3:// URIs.")
    if not tracking.has_explicit_store(cfg.tracking.uri):
        store = secrets.redact_text(cfg.tracking.uri or "the default MLflow store sqlite:///<cwd>/mlflow.db")
        raise JobPathError(f"inside a Ray job, {store} would land in the job's temporary working directory: "
                           "set tracking.uri to an MLflow server or an absolute "
                           "sqlite:////path, or export MLFLOW_TRACKING_URI (e.g. ray job submit "
                           "--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": ...}}').")


class ClusterPathError(ValueError):
    """A local path on a cluster of several nodes that the config does not declare shared."""


def start_ray(cfg: RunConfig) -> None:
    """Join or start Ray, then refuse local paths a multi-node cluster cannot share."""
    ray_data.init_ray(cfg.compute.ray_address)
    check_local_paths_on_cluster(cfg, ray_data.alive_nodes())


def check_local_paths_on_cluster(cfg: RunConfig, nodes: int) -> None:
    """Decode tasks and writer tasks run on every node: on a cluster of several nodes a local path
    means each node's own disk (inputs missing on some nodes, outputs scattered over all of them),
    unless every node mounts it at the same path (`compute.shared_filesystem`)."""
    if nodes < 2 or cfg.compute.shared_filesystem:
        return
    paths = {"source.uri": cfg.source.uri, "output.uri": cfg.output.uri,
             "evaluation.wanted_uri": cfg.evaluation.wanted_uri, "evaluation.unwanted_uri": cfg.evaluation.unwanted_uri}
    local = [f"{name}={value!r}" for name, value in paths.items() if value and storage.is_local(value)]
    if local:
        raise ClusterPathError(
            f"the Ray cluster has {nodes} nodes and these are local paths: {', '.join(local)}; each node would read "
            "and write its own disk. Use s3:// URIs, or, if the paths are on storage every node mounts at the same "
            "path (NFS, Lustre), set compute.shared_filesystem: true.")


def check_output_outside_source(source_uri: str, output_uri: str) -> None:
    """The source listing is recursive: an output inside the source would be curated by the next run."""
    if storage.is_within(output_uri, source_uri):
        raise OutputConflictError(f"output.uri {output_uri!r} lies inside source.uri {source_uri!r}; the next run "
                                  "would curate its own outputs. Choose an output location outside the source.")
