"""Damaged entries are found by verify and by reads, never used, and replaced."""

from __future__ import annotations

import fsspec
import pytest
import torch

from editflow.cache import Cache, Damage, DamagedEntryError

KEY = "d4" * 32


def _data_files(cache: Cache, array: str) -> list[str]:
    """Chunk (or shard) files of one array of the published entry."""
    fs, root = fsspec.core.url_to_fs(cache.url)
    entry = cache.get(KEY)
    folder = f"{root.rstrip('/')}/objects/{KEY}/{entry.object_id}/{array}"
    return sorted(path for path in fs.find(folder) if not path.endswith("/zarr.json"))


def _flip_byte(cache: Cache, path: str, offset: int = 20) -> None:
    fs, _ = fsspec.core.url_to_fs(cache.url)
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_verify_finds_a_corrupted_chunk_and_reads_refuse_it(cache: Cache) -> None:
    noise_maps = torch.randn(5, 4, 16)
    cache.put(
        KEY,
        {"noise_maps": noise_maps, "prompt_embeds": torch.randn(3, 8)},
        {},
        stream_axis={"noise_maps": 0},
    )
    entry = cache.get(KEY)
    assert cache.verify() == []
    chunks = _data_files(cache, "noise_maps")
    _flip_byte(cache, chunks[-1] if cache.is_local else chunks[0])  # last step / the shard

    damages = cache.verify()

    assert [(damage.key, damage.array) for damage in damages] == [(KEY, "noise_maps")]
    assert isinstance(damages[0], Damage)
    with pytest.raises(DamagedEntryError, match=f"'noise_maps' of cache entry {KEY}") as caught:
        entry.tensor("noise_maps")
    assert caught.value.key == KEY and caught.value.array == "noise_maps"
    assert not cache.has(KEY)  # known damaged: the engine recomputes it
    assert not Cache(cache.url).has(KEY)  # other processes know it too (damaged/<key>.json)

    cache.discard(KEY)
    assert not cache.has(KEY)
    assert cache.get(KEY) is None


def test_corrupted_step_fails_a_one_step_read(cache: Cache) -> None:
    attention = torch.randn(4, 16384)  # 64 KiB steps: one chunk per step, in one shard
    entry = cache.put(KEY, {"attention": attention}, {}, stream_axis={"attention": 0})
    [shard] = _data_files(cache, "attention")
    _flip_byte(cache, shard)  # inside the first step's chunk
    assert torch.equal(entry.step("attention", 3), attention[3])  # other chunks are fine
    with pytest.raises(DamagedEntryError):
        entry.step("attention", 0)


def test_deleted_chunk_is_reported_by_verify(cache: Cache) -> None:
    cache.put(KEY, {"latent": torch.randn(2, 4, 4) + 5}, {})
    fs, _ = fsspec.core.url_to_fs(cache.url)
    fs.rm(_data_files(cache, "latent")[0])
    assert [damage.array for damage in cache.verify([KEY])] == ["latent"]


def test_damage_found_by_a_read_makes_the_next_writer_replace_the_entry(cache: Cache) -> None:
    latent = torch.randn(4, 8)
    entry = cache.put(KEY, {"latent": latent}, {"run": 1})
    _flip_byte(cache, _data_files(cache, "latent")[0])
    with pytest.raises(DamagedEntryError):
        entry.tensor("latent")
    assert not cache.has(KEY)
    with pytest.raises(DamagedEntryError):
        cache.get(KEY)

    replacement = cache.put(KEY, {"latent": latent}, {"run": 2})

    assert replacement.attrs == {"run": 2}
    assert cache.has(KEY)
    assert torch.equal(cache.get(KEY).tensor("latent"), latent)
    assert cache.verify() == []


def test_unreadable_manifest_is_damage(cache: Cache) -> None:
    cache.put(KEY, {"latent": torch.zeros(2)}, {})
    fs, root = fsspec.core.url_to_fs(cache.url)
    fs.pipe_file(f"{root.rstrip('/')}/refs/{KEY[:2]}/{KEY}.json", b"{not json")

    with pytest.raises(DamagedEntryError, match="manifest unreadable"):
        cache.get(KEY)
    assert [(damage.key, damage.array) for damage in cache.verify()] == [(KEY, None)]
    assert not cache.has(KEY)
    cache.discard(KEY)
    assert cache.get(KEY) is None
