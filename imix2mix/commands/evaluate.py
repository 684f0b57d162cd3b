"""``imix2mix evaluate SUITE --out DIR``: run an evaluation suite through the collection pipeline and
write its report (``--report-only``: rebuild the report from the manifests, without Prefect or Ray)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imix2mix.commands import add_memory_argument, parse_settings


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="run an evaluation suite (e.g. the paper's) and write report.md with its tables and charts",
        description="Run SUITE (a bundled suite such as 'paper', or a suite file) as one collection batch per variant "
                    "(resumes: runs already done are skipped), then write DIR/report.md: per-variant means of every "
                    "metric beside the paper's Table 1 and Table 3 numbers, per-edit tables, bar charts and contact "
                    "sheet grids.",
    )
    evaluate.add_argument("suite", help="bundled suite name (paper) or path to a suite YAML file")
    evaluate.add_argument("--out", required=True, type=Path, help="output folder: variants/<variant>/..., report.md")
    evaluate.add_argument("--preset", choices=("full", "tiny"), default="full",
                          help="full: official weights; tiny: small random models (the report says its numbers are meaningless)")
    evaluate.add_argument("--scenes", type=_names, default=None, help="comma-separated scene names (default: all)")
    evaluate.add_argument("--modes", type=_names, default=None, help="comma-separated variant names (default: all)")
    evaluate.add_argument("--data", type=Path, default=None,
                          help="folder the suite's relative scene paths start from (default: the current folder)")
    evaluate.add_argument("--report-only", action="store_true", help="only rebuild the report from the manifests")
    evaluate.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                          help="override an EditConfig setting for every run (a variant's own settings win)")
    add_memory_argument(evaluate)
    evaluate.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                          help="auto: GPUs when the Ray cluster has them (one actor per GPU)")
    evaluate.add_argument("--workers", type=int, default=None, help="EditWorker actors (default: one per GPU, or 1)")
    evaluate.add_argument("--concurrency", type=int, default=None, help="runs in flight (default: --workers)")
    evaluate.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS, else local)")
    evaluate.add_argument("--cache", default=None, help="cache for fetched inputs, SfM poses, Ray sessions")
    evaluate.add_argument("--weights-dir", default=None, help="full preset: local weights folder instead of the Hub")
    evaluate.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    out = args.out.expanduser().resolve()
    if args.report_only:
        from imix2mix.config import EditConfig
        from imix2mix.report import build_report
        from imix2mix.suite import load_suite, plan_suite

        plan = plan_suite(load_suite(args.suite).select(args.scenes, args.modes), out,
                          (args.data or Path(".")).expanduser().resolve(), EditConfig(), stage=False)
        build_report(plan, out)
        for problem in plan.problems:
            print(f"left out: {problem}")
        print(f"report: {out / 'report.md'}")
        return 0
    from imix2mix.commands.pipeline import _print_runs, allow_slow_ephemeral_server

    from imix2mix.config import apply_allocator, memory_settings

    allow_slow_ephemeral_server(os.environ)
    apply_allocator(args.memory, os.environ)  # the EditWorkers' allocator (tasks.distill.worker_env_vars)
    from flows.evaluate_suite import evaluate_suite

    summary = evaluate_suite(
        suite=args.suite, output_root=str(out), preset=args.preset, scenes=args.scenes, modes=args.modes,
        data_root=None if args.data is None else str(args.data), config_overrides=memory_settings(args.memory, parse_settings(args.settings)),
        ray_address=args.ray_address, concurrency=args.concurrency, device=args.device, workers=args.workers,
        cache_dir=args.cache, weights_dir=args.weights_dir,
    )
    for problem in summary["problems"]:
        print(f"left out: {problem}")
    totals = {"succeeded": 0, "failed": 0, "skipped": 0}
    for name, batch in summary["variants"].items():
        print(f"== {name}: {batch['succeeded']} succeeded, {batch['failed']} failed, {batch['skipped']} skipped")
        _print_runs(batch["runs"])
        for status in totals:
            totals[status] += batch[status]
    print(f"{totals['succeeded']} succeeded, {totals['failed']} failed, {totals['skipped']} skipped; "
          f"report: {summary['report']}")
    return 1 if totals["failed"] else 0
