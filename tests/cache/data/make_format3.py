"""How ``format3/`` was made: a small cache written by editflow's cache before one-shard
streams, pixel-encoded arrays and direct reads of several shards (commit edc41a0's
``cache/``), with steps made small enough to spread over several shards.

    before=$(mktemp -d) && git archive edc41a0 cache | tar -x -C "$before"
    HF_HUB_OFFLINE=1 .venv/bin/python tests/cache/data/make_format3.py "$before/cache" OUT

``tests/cache/test_old_entries.py`` reads it with today's cache.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import editflow  # noqa: F401  (the package the old cache is put under)

old, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location(
    "editflow.cache", old / "__init__.py", submodule_search_locations=[str(old)]
)
module = importlib.util.module_from_spec(spec)
sys.modules["editflow.cache"] = module
spec.loader.exec_module(module)

import torch  # noqa: E402

import editflow.cache.writer as writer_module  # noqa: E402
from editflow.cache import Cache, StepsWriter  # noqa: E402

shutil.rmtree(out, ignore_errors=True)
writer_module.MIN_CHUNK_BYTES = 1024  # one step a chunk from 1 KiB (64 KiB in editflow)
writer_module.LOCAL_SHARD_BYTES = 3 * 1024  # three steps a shard (16 MiB in editflow)
generator = torch.Generator().manual_seed(3)
maps = [
    torch.rand(7, 2, 8, 32, generator=generator).half(),  # 1 KiB steps: 3 shards of 3, 3, 1
    torch.rand(7, 2, 4, 64, generator=generator).half(),
]
noise = torch.randn(5, 4, 8, 8, generator=generator)  # a sequence written whole: one shard
image = torch.randint(0, 256, (1, 3, 16, 16), generator=generator).float() / 255  # float32
with Cache(out).writer("a1" * 32, {"stage": "fixture"}) as writer:
    steps = StepsWriter(lambda: writer, "attention_maps", 7, dtype=torch.float16)
    for index in range(7):
        steps.write(index, {"down": maps[0][index], "up": maps[1][index]})
    writer.write("noise", noise, stream_axis=0)
    writer.write("image", image)
    writer.set_attrs(streams={"attention_maps": steps.description()})
