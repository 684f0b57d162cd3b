"""``imix2mix manifests rebuild OUT``: rebuild an output root's Parquet manifests from its runs' run.json files."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    manifests = subparsers.add_parser("manifests", help="maintain an output root's Parquet manifests")
    actions = manifests.add_subparsers(dest="action", metavar="ACTION", required=True)
    rebuild = actions.add_parser(
        "rebuild", help="rebuild the scenes/runs/views rows of every published run from its run.json",
        description="Read every OUT/<scene>/<run>/run.json written by a collection run and upsert its scene, run and "
                    "view rows into OUT/manifests (a corrupt table is moved aside first; failed and skipped rows "
                    "that only the tables held are kept where they can still be read).",
    )
    rebuild.add_argument("out", help="output root (a folder or an fsspec URL)")
    rebuild.set_defaults(handler=run_rebuild)


def run_rebuild(args: argparse.Namespace) -> int:
    from imix2mix.manifests import rebuild_manifests
    from imix2mix.storage import check_output_root

    counts = rebuild_manifests(check_output_root(args.out, needed_bytes=0))
    print(f"rebuilt {counts['runs']} run(s), {counts['views']} view(s), {counts['scenes']} scene(s) from run.json files"
          + (f"; {counts['skipped']} run.json file(s) without manifest rows skipped" if counts["skipped"] else ""))
    return 0
