"""Float32 arrays on the 1/255 grid (images from PNGs, figures, binary masks) are stored as
their uint8 codes and read back bit for bit; the manifest still describes the values."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from editflow.cache import Cache, DamagedEntryError
from editflow.cache.dtypes import from_pixel_codes, pixel_codes

KEY = "e7" * 32


def _png_pixels() -> torch.Tensor:
    """(1, 3, H, W) float32 as a PNG reads (``stages.images.from_pil``: uint8 / 255)."""
    codes = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(codes, "RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def _manifest(cache: Cache, key: str = KEY) -> dict:
    fs, root = fsspec.core.url_to_fs(cache.url)
    return json.loads(fs.cat_file(f"{root.rstrip('/')}/refs/{key[:2]}/{key}.json"))


def test_every_code_decodes_to_what_torch_and_numpy_compute() -> None:
    codes = np.arange(256, dtype=np.uint8)
    decoded = from_pixel_codes(codes)
    assert np.array_equal(decoded, torch.arange(256, dtype=torch.uint8).float().div(255).numpy())
    assert np.array_equal(decoded, codes.astype(np.float32) / 255.0)
    tiled = np.tile(decoded, 8)  # 8 KiB: big enough to encode
    assert np.array_equal(pixel_codes(tiled), np.tile(codes, 8))


@pytest.mark.parametrize(
    "values",
    [
        np.full(1024, 0.5, np.float32),  # 0.5 is no k / 255
        np.concatenate([np.zeros(1023, np.float32), [np.float32(2 / 255) + 1e-7]]),
        np.concatenate([np.zeros(1023, np.float32), [-0.0]]).astype(np.float32),
        np.concatenate([np.zeros(1023, np.float32), [np.nan]]).astype(np.float32),
        np.concatenate([np.zeros(1023, np.float32), [256 / 255]]).astype(np.float32),
        np.zeros(1024, np.float64),  # not float32
        np.zeros(16, np.float32),  # too small to bother
    ],
    ids=["off the grid", "one value off", "-0.0", "nan", "above 1", "float64", "small"],
)
def test_anything_not_exactly_on_the_grid_is_stored_as_it_is(values: np.ndarray) -> None:
    assert pixel_codes(values) is None


def test_an_image_from_a_png_is_stored_as_uint8_and_read_back_bit_for_bit(cache: Cache) -> None:
    image = _png_pixels()
    entry = cache.put(KEY, {"image": image, "noise": torch.randn(1, 3, 40, 24)}, {})
    info = entry.arrays["image"]
    assert (info.dtype, info.torch_dtype, info.encoding, info.nbytes) == (
        "float32", "float32", "pixels", image.numel(),
    )  # fmt: skip
    assert entry.arrays["noise"].encoding is None
    read = Cache(cache.url).get(KEY).tensor("image")
    assert read.dtype == torch.float32
    assert torch.equal(read.view(torch.int32), image.view(torch.int32))
    manifest = _manifest(cache)
    assert manifest["format"] == 4 and "encoding" not in manifest["arrays"]["noise"]
    assert cache.verify() == []


def test_the_manifest_describes_the_values_however_they_are_stored(cache: Cache) -> None:
    image = _png_pixels()
    encoded = cache.put(KEY, {"image": image}, {}).arrays["image"]
    shifted = image + 1e-3  # off the grid: stored as float32
    plain = cache.put("e8" * 32, {"image": shifted}, {}).arrays["image"]
    assert plain.encoding is None and plain.nbytes == 4 * image.numel()
    assert _manifest(cache, "e8" * 32)["format"] == 3  # what every reader reads
    # An output's digest (editflow.cli.lock) is of shape, dtype, torch dtype and checksums:
    # of the values, so the same image stored either way has the same digest.
    from editflow.cache.dtypes import checksum_of

    assert encoded.checksum == checksum_of(image.numpy())
    assert (encoded.shape, encoded.dtype, encoded.torch_dtype) == (
        plain.shape, plain.dtype, plain.torch_dtype,
    )  # fmt: skip


def test_a_corrupted_code_is_damage(cache: Cache) -> None:
    cache.put(KEY, {"image": _png_pixels()}, {})
    entry = cache.get(KEY)
    fs, root = fsspec.core.url_to_fs(cache.url)
    folder = f"{root.rstrip('/')}/objects/{KEY}/{entry.object_id}/image"
    [chunk] = [path for path in fs.find(folder) if not path.endswith("zarr.json")]
    data = bytearray(fs.cat_file(chunk))
    data[7] ^= 0x01
    fs.pipe_file(chunk, bytes(data))
    assert [damage.array for damage in Cache(cache.url).verify()] == ["image"]
    with pytest.raises(DamagedEntryError):
        entry.tensor("image")


def test_an_unknown_encoding_makes_the_manifest_unreadable(cache: Cache) -> None:
    cache.put(KEY, {"image": _png_pixels()}, {})
    fs, root = fsspec.core.url_to_fs(cache.url)
    manifest = _manifest(cache)
    manifest["arrays"]["image"]["encoding"] = "jpeg"
    fs.pipe_file(f"{root.rstrip('/')}/refs/{KEY[:2]}/{KEY}.json", json.dumps(manifest).encode())
    assert not Cache(cache.url).has(KEY)  # damaged: recomputed, never misread


def test_big_arrays_are_checked_block_by_block() -> None:
    from editflow.cache import dtypes

    codes = np.random.default_rng(1).integers(0, 256, 2 * dtypes._BLOCK + 5, dtype=np.uint8)
    values = from_pixel_codes(codes)
    assert np.array_equal(pixel_codes(values), codes)
    values[dtypes._BLOCK + 3] += np.float32(1e-6)  # off the grid, in the second block
    assert pixel_codes(values) is None
