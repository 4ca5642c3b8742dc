"""``concord data``: prepare datasets for the data-sharing modes.

    concord data shard mnist --out file:///shared/mnist --shards 16
    concord data verify file:///shared/mnist

``shard`` writes K shard files plus ``manifest.json`` (sample counts, sha256 per shard) to any
fsspec URL; workers then read them with ``concord train --data dfs:URL``. ``verify`` reads
every shard back and checks its hash.
"""

from __future__ import annotations

import argparse

from concord.data.sources import NAMES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "data", help="prepare datasets: shard to a DFS URL, verify shards"
    )
    sub = parser.add_subparsers(dest="data_command", required=True)
    shard = sub.add_parser("shard", help="write a dataset as K shard files plus a manifest")
    shard.add_argument("dataset", help=f"dataset name: {', '.join(NAMES)}")
    shard.add_argument("--out", required=True, help="fsspec URL, e.g. file:///shared/mnist")
    shard.add_argument("--shards", type=int, required=True, help="number of shard files K")
    verify = sub.add_parser("verify", help="read every shard of URL and check its sha256")
    verify.add_argument("url", help="fsspec URL written by `concord data shard`")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    from concord.data.dfs import verify_shards, write_shards
    from concord.data.sources import named_dataset

    if args.data_command == "shard":
        data = named_dataset(args.dataset)
        manifest = write_shards(data, args.out, args.shards, name=args.dataset)
    else:
        manifest = verify_shards(args.url)
    total = sum(s.nbytes for s in manifest.shards)
    print(
        f"{manifest.name}: {manifest.num_samples} samples in {len(manifest.shards)} shards "
        f"({total / 1e6:.1f} MB) at {getattr(args, 'out', None) or args.url}"
        + (", all hashes verified" if args.data_command == "verify" else "")
    )
    return 0
