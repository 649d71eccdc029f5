"""What ``editflow cache ...`` shows and accepts: aligned listings, sizes, key prefixes."""

from __future__ import annotations

from collections.abc import Iterable

from editflow.errors import CacheError

from .maintenance import EntryInfo

MIN_PREFIX = 8  # characters of a key prefix that `cache rm` accepts


def human_size(count: float) -> str:
    """``512 B``, ``1.5 KiB`` ... ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def listing(infos: Iterable[EntryInfo]) -> list[str]:
    """One line per entry (key prefix, kind, stage, size, recipe), in aligned columns."""
    rows = [
        (
            info.key[:16],
            str((info.attrs or {}).get("kind", "?")),
            str((info.attrs or {}).get("stage", "?")),
            human_size(info.stored_bytes),
            str((info.attrs or {}).get("recipe", "")),
        )
        for info in infos
    ]
    widths = [max((len(row[column]) for row in rows), default=0) for column in range(4)]
    return [
        f"{key:<{widths[0]}}  {kind:<{widths[1]}}  {stage:<{widths[2]}}  "
        f"{size:>{widths[3]}}  {recipe}".rstrip()
        for key, kind, stage, size, recipe in rows
    ]


def keys_for_prefixes(keys: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The one key each prefix names; short prefixes are refused so a typo cannot remove much.

    Raises:
        CacheError: A prefix is shorter than :data:`MIN_PREFIX`, or names no entry or several.
    """
    keys, prefixes = list(keys), list(prefixes)
    short = [prefix for prefix in prefixes if len(prefix) < MIN_PREFIX]
    if short:
        raise CacheError(
            f"key prefix {short[0]!r} is shorter than {MIN_PREFIX} characters",
            file="cache rm",
            hint="give a longer prefix (see 'editflow cache ls'), or --all to remove every entry",
        )
    chosen = []
    for prefix in prefixes:
        matches = [key for key in keys if key.startswith(prefix)]
        if len(matches) != 1:
            found = "no entry" if not matches else f"{len(matches)} entries"
            raise CacheError(f"{found} match {prefix!r}", file="cache rm")
        chosen += matches
    return chosen
