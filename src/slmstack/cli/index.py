"""``slmstack index``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmstack.cli.common import VERBS


def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        type=Path,
        required=True,
        help='.jsonl ({"text": ..., "id": ...} per line, id optional) or .txt (one passage per line)',
    )
    p.add_argument("--out", type=Path, required=True, help="the index folder (a stack's retrieve stage names it)")
    p.add_argument("--kind", default="bm25", help="retriever kind (bm25)")


def index_cmd(args: argparse.Namespace) -> int:
    """Build a passage index once, on disk, for ``kind: retrieve`` stages."""
    from slmstack.ownership import check_dir_ours
    from slmstack.retrieval import RETRIEVERS, build_index

    RETRIEVERS.get(args.kind)  # an unknown kind, before anything is read
    check_dir_ours(args.out, "index", "--out index folder")
    record = build_index(args.corpus, args.out, args.kind)
    print(json.dumps({"out": str(args.out), "kind": record["kind"], "passages": record["passages"]}))
    return 0


VERBS.add("index", (_index_args, index_cmd, "build a passage index (BM25) for a stack's retrieve stage"))
