"""``editflow cache``: list, inspect, verify and collect the cache."""

from __future__ import annotations

import argparse
import json
import time

from editflow.cli.common import open_cache_of
from editflow.errors import EditflowError


def cmd_cache(args: argparse.Namespace) -> int:
    from editflow.cache.report import human_size, keys_for_prefixes, listing

    cache = open_cache_of(args)
    if args.action == "ls" and getattr(args, "json", False):
        rows = [
            {
                "key": info.key,
                "kind": (info.attrs or {}).get("kind"),
                "stage": (info.attrs or {}).get("stage"),
                "recipe": (info.attrs or {}).get("recipe"),
                "stored_bytes": info.stored_bytes,
                "created": info.created,
            }
            for info in cache.ls()
        ]
        print(json.dumps(rows, indent=2))
    elif args.action == "ls":
        print("\n".join(listing(cache.ls())) or "the cache is empty")
    elif args.action == "du":
        usage = cache.du()
        print(f"{usage.entries} entries, {human_size(usage.entry_bytes)}")
        if usage.staging_bytes:
            print(f"{human_size(usage.staging_bytes)} in unpublished leftovers (editflow cache gc)")
    elif args.action == "verify":
        damages = cache.verify()
        for damage in damages:
            print(f"damaged {damage.key} {damage.array}: {damage.reason}")
        if damages and not args.keep_damaged:
            for key in sorted({damage.key for damage in damages}):
                cache.discard(key)
            print(f"removed {len({d.key for d in damages})} damaged entries; reruns recompute them")
        if not damages:
            print("all entries intact")
        return 1 if damages else 0
    elif args.action == "gc":
        cutoff = time.time() - (args.older_than_days or 0) * 86400
        keep = (lambda info: info.created >= cutoff) if args.older_than_days is not None else None
        report = cache.gc(keep=keep)
        print(
            f"removed {len(report.removed_entries)} entries and {report.removed_staging} unpublished "
            f"leftovers, freed {human_size(report.freed_bytes)}"
        )
    elif args.action == "rm":
        if args.all == bool(args.keys):
            raise EditflowError("give entry keys or --all (not both)", file="cache rm")
        keys = [info.key for info in cache.ls()]
        print(
            f"removed {cache.rm(keys if args.all else keys_for_prefixes(keys, args.keys))} entries"
        )
    return 0
