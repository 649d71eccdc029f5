"""editflow's content-addressed, write-once, crash-safe zarr v3 cache.

A cache root is a local folder or any fsspec URL (``memory://``, ``file://``, ``s3://`` ...)::

    editflow-cache.json              {"format": 1}, written on first write
    objects/<key>/<object-id>/       zarr v3 group (one array per name) of one writer
    refs/<key[:2]>/<key>.json        the manifest; an entry exists for readers only if this does
    damaged/<key>.json               {"object": id, "reason": ...} for entries found damaged
    records/<quoted-name>.json       small JSON documents (``put_record``)

The manifest holds the key, the object id, the creation time, stored bytes, the JSON attrs
(key preimage, recipe, stage, timings, device, texts) with their sha256 and, per array: shape,
dtype of the values, torch dtype, chunks, shards, stream axis, codec, chunk key separator,
encoding (when not stored as its dtype), the xxh3-128 of the values' C-order bytes, and the
xxh3-128 of each step along the stream axis.

Publish protocol:

1. ``writer(key, attrs)`` creates ``objects/<key>/<fresh uuid4>/`` and writes arrays there.
   This folder is staging: readers of the cache never see it. The one exception is a live
   stream (``create_stream(..., live=True)``, in a folder the caller named with
   ``object_id``): another worker may follow its steps as they are written, and publishes
   what it makes from them only after checking them against the published entry
   (``live``).
2. On clean exit the manifest is created *exclusively* at ``refs/.../<key>.json``. Locally it
   is written to a temporary file in the same folder and ``os.link``-ed into place,
   so it appears complete or not at all and an existing ref makes the link fail. Remote
   filesystems use ``fs.pipe_file(path, data, mode="create")``: atomic where the backend has
   conditional writes (``memory://``; S3 through If-None-Match in recent s3fs); elsewhere
   fsspec falls back to check-then-write, where two writers racing within that window can
   both believe they won (both objects hold the same content-addressed data; the overwritten
   one becomes an orphan for ``gc``).
3. The first writer wins (``won`` True). A loser deletes its object and hands out the
   winner's entry. An exception in the ``with`` block deletes the staging object and
   publishes nothing; a killed process leaves an orphan object that ``gc`` removes once its
   newest file is older than ``older_than_s`` (default one hour), which is what keeps ``gc``
   from breaking a writer that is still at work.

Storage: arrays written with a stream axis (noise sequences ``(T, C, H, W)``, attention maps
``(steps, ...)``) have one step per chunk once a step reaches 64 KiB (an SD 1.x latent), so
``Entry.step`` reads one chunk; smaller steps share chunks of about 64 KiB. The chunks are
grouped into shards read by byte range: on local disk one shard file per raw array, each
step written at its place as it comes (``shards.ShardWriter``); on object stores 64 MiB
shards (16 MiB for compressed local streams), buffered until complete. Other arrays are one
chunk. Chunks are raw unless a writer asks for zstd (level 1). On local disk the writer
writes the zarr metadata of its group and raw arrays itself (``metadata``) and keeps shard
files beside their array's metadata (chunk keys ``c.0.0``), and reads of raw streams go
straight to the shard files (``shards.ShardedArray``), zarr reading everything else. A
float32 array (not streamed) whose values are all ``k / 255`` (a figure, an image from a
PNG) is stored as its uint8 codes and read back bit for bit (``encoding: "pixels"``; such a
manifest is format 4, every other one format 3). One checksum layer: a corrupt chunk fails
even a one-step read through that step's xxh3-128. bfloat16 is stored as float32 and
restored on read. Reads return new tensors and verify checksums (whole array, or the step's
own); a mismatch or decode failure raises ``DamagedEntryError``, remembers the entry as
damaged (``has`` turns False) and the next writer of that key replaces it. No pickle: arrays
are zarr, the rest JSON.
"""

from .entry import ArrayInfo, Damage, DamagedEntryError, Entry, ReadStats
from .live import FollowLost, LiveSteps
from .maintenance import DiskUsage, EntryInfo, GcReport
from .store import Cache, default_cache_url
from .streams import STREAMS_ATTR, CachedSteps, StepsWriter
from .writer import EntryWriter, StreamHandle

__all__ = [
    "ArrayInfo",
    "Cache",
    "CachedSteps",
    "Damage",
    "DamagedEntryError",
    "DiskUsage",
    "Entry",
    "EntryInfo",
    "EntryWriter",
    "FollowLost",
    "GcReport",
    "LiveSteps",
    "ReadStats",
    "STREAMS_ATTR",
    "StepsWriter",
    "StreamHandle",
    "default_cache_url",
]
