"""``imix2mix collection ROOT`` (edit a whole collection as a Prefect flow on Ray actors) and
``imix2mix watch ROOT`` (announce complete scene folders as Prefect events).

Prefect, Ray and the flows are imported inside the handlers only, so the rest of the CLI and the
library work without them.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from imix2mix.commands import add_selection_arguments, selected_settings
from imix2mix.orphans import start_watchdog

EPHEMERAL_SERVER_STARTUP_SECONDS = 120


def allow_slow_ephemeral_server(environ: MutableMapping[str, str]) -> None:
    """Give Prefect's temporary local API server (used without PREFECT_API_URL)
    ``EPHEMERAL_SERVER_STARTUP_SECONDS`` to start instead of Prefect's 20 s: on a busy 2-core machine
    its start has taken longer.  A user's own setting wins.
    Call before Prefect is imported: it reads its settings then."""
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_SERVER_STARTUP_SECONDS))


def quiet_temporary_server(environ: MutableMapping[str, str]) -> None:
    """Prefect's telemetry off unless the user chose otherwise: the temporary server's heartbeat writes to
    its SQLite database while the flow run does, and printed a ``database is locked`` traceback on
    every run (offline it also fails to send).  Call before Prefect is imported."""
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def register(subparsers: argparse._SubParsersAction) -> None:
    collection = subparsers.add_parser(
        "collection",
        help="edit every scene folder of a collection (Prefect flow + Ray actors; resumes where it stopped)",
        description="Edit every scene folder under ROOT with its edits.yaml (and --edits). Runs the "
                    "edit-collection flow on the Prefect API in PREFECT_API_URL, or on a temporary local one, and a "
                    "Ray cluster (RAY_ADDRESS / --ray-address, or a local one). Runs that already succeeded with "
                    "the same config are skipped.",
    )
    collection.add_argument("root", help="collection root: a folder of scene folders, or an fsspec URL (s3://, gs://)")
    collection.add_argument("--edits", default=None, help="edits file applied to every scene (same schema as edits.yaml)")
    collection.add_argument("--out", default="outputs",
                            help="output root, a folder or an fsspec URL (s3://bucket/prefix): <scene>/<edit>-<run hash>/ "
                                 "and manifests/ (default: outputs)")
    collection.add_argument("--preset", choices=("full", "tiny"), default="full",
                            help="full: official weights; tiny: small random models that exercise the pipeline")
    collection.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                            help="override an EditConfig setting for every run (repeatable)")
    add_selection_arguments(collection)
    collection.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                            help="auto: GPUs when the Ray cluster has them (one actor per GPU)")
    collection.add_argument("--workers", type=int, default=None, help="EditWorker actors (default: one per GPU, or 1)")
    collection.add_argument("--concurrency", type=int, default=None, help="runs in flight (default: --workers)")
    collection.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else local)")
    collection.add_argument("--cache", default=None, help="cache for fetched inputs, SfM poses, Ray sessions "
                                                           "(default: $IMIX2MIX_CACHE or ~/.cache/imix2mix)")
    collection.add_argument("--weights-dir", default=None, help="full preset: local weights folder instead of the Hub")
    collection.add_argument("--plan", action="store_true", help="only print what would run and what would be skipped")
    collection.set_defaults(handler=run_collection)

    watch = subparsers.add_parser(
        "watch",
        help="emit imix2mix.scene.ready Prefect events when scene folders under ROOT are complete",
        description="Watch ROOT (a folder, by file-system notifications; or an fsspec URL, by polling). A scene folder "
                    "is complete when it holds the marker file, or when it has not changed for the quiet period. Each "
                    "scene content is announced at most once (remembered in the state file). Needs PREFECT_API_URL.",
    )
    watch.add_argument("root", help="collection root to watch (folder or fsspec URL)")
    watch.add_argument("--marker", default="_READY", help="file that marks a scene folder complete (default: _READY)")
    watch.add_argument("--quiet", type=float, default=30.0,
                       help="seconds without change after which a folder without marker is complete (default: 30)")
    watch.add_argument("--poll", type=float, default=5.0, help="seconds between rescans (default: 5)")
    watch.add_argument("--state", default=None, help="state file of announced scenes (default: in the cache folder)")
    watch.add_argument("--once", action="store_true", help="scan once, announce what is ready, and exit")
    watch.set_defaults(handler=run_watch)


def _print_runs(rows: list[dict[str, Any]]) -> None:
    # print() looks sys.stdout up per call; a stream bound at import time may be closed by now (pytest's capture).
    for row in rows:
        metrics = "" if row.get("clip_dir") is None else f"  CLIP dir {row['clip_dir']:.3f}"
        note = f"  ({row['note']})" if row.get("note") else ""
        print(f"{row['status']:<10} {row['scene']} · {row['edit'] or '-'}{metrics}{note}")
        if row.get("no_edit"):
            print(f"warning: {row['scene']} · {row['edit']}: no edit happened (the edited views are near-identical to "
                  "the photos; see runs.parquet changed_fraction)")


def _checked_overrides(args: argparse.Namespace) -> dict[str, str]:
    """``--set`` values, refused when bad (e.g. ``lr=nan``) before Prefect and Ray start (torch-free)."""
    from imix2mix.config import default_config

    overrides = selected_settings(args)
    default_config(args.preset).overridden(overrides)
    return overrides


def run_collection(args: argparse.Namespace) -> int:
    from imix2mix.storage import check_output_root, open_output_root

    overrides = _checked_overrides(args)
    if args.plan:
        return _print_plan(args, overrides, open_output_root(args.out))
    from imix2mix.config import apply_allocator

    apply_allocator(args.memory, os.environ)  # the EditWorkers' allocator (tasks.distill.worker_env_vars)
    check_output_root(args.out)  # a read-only, full or unreachable root fails here, before Prefect and Ray start
    allow_slow_ephemeral_server(os.environ)
    quiet_temporary_server(os.environ)
    # The temporary Prefect server and the local Ray are this process's children: if it is killed,
    # the watchdog stops them.
    start_watchdog()
    from flows.edit_collection import edit_collection

    state = edit_collection(
        root=args.root, edits=args.edits, output_root=args.out, preset=args.preset, config_overrides=overrides,
        ray_address=args.ray_address, concurrency=args.concurrency, device=args.device, workers=args.workers,
        cache_dir=args.cache, weights_dir=args.weights_dir, return_state=True,
    )
    # A batch with failed edits ends in a Failed state that still carries the summary; a flow that could
    # not run at all carries its exception (an ImixError is printed as one line by the CLI).
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, BaseException):
        raise summary
    _print_runs(summary["runs"])
    print(f"{summary['succeeded']} succeeded, {summary['failed']} failed, {summary['skipped']} skipped; "
          f"outputs and manifests in {summary['output_root']}")
    return 1 if summary["failed"] else 0


def _print_plan(args: argparse.Namespace, overrides: dict[str, str], output_root: Any) -> int:
    from imix2mix.collection import collection_edit_document, list_scenes, open_root, plan_collection
    from imix2mix.manifests import ManifestStore, succeeded_runs
    from imix2mix.config import default_config

    plan = plan_collection(
        list_scenes(open_root(args.root)), collection_edit_document(args.edits), default_config(args.preset),
        preset=args.preset, output_root=output_root, succeeded=succeeded_runs(ManifestStore(output_root)),
        base_overrides=overrides,
    )
    for run in plan.runs:
        state = "skip" if run.skip else "run"
        print(f"{state:<5} {run.label}  (config {run.config_hash[:12]}) -> {run.output_dir}")
    for problem in plan.problems:
        print(f"error {problem.scene.scene_id}: {problem.error}")
    print(f"{len(plan.to_run)} to run, {len(plan.skipped)} already done, {len(plan.problems)} scene problem(s)")
    return 1 if plan.problems else 0


def run_watch(args: argparse.Namespace) -> int:
    from deployments.watcher import watch
    from imix2mix.collection import open_root
    from imix2mix.watching import WatchSettings, default_state_file
    from tasks.settings import default_cache_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = open_root(args.root)
    state = Path(args.state) if args.state else default_state_file(root.uri, default_cache_dir())
    settings = WatchSettings(quiet_seconds=args.quiet, marker=args.marker, poll_seconds=args.poll)
    count = watch(root.uri, state, settings, once=args.once)
    print(f"announced {count} scene(s)")
    return 0
