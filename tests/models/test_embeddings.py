"""Textual-inversion embeddings (``[[model.embedding]]``): a file's token works in prompts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support import invert_recipe

from editflow.cache import Cache
from editflow.cli import main
from editflow.engine.api import models_dir_for, plan_recipe, run_recipe
from editflow.errors import ModelUnavailableError
from editflow.models import RunModels
from editflow.models.tiny import TINY_COMPONENTS
from editflow.stages.diffusion import encode_prompts

WIDTH = TINY_COMPONENTS["text_encoder"].config["hidden_size"]
TOKEN = "<cat-toy>"


def vector(seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def recipe(folder: Path, embeddings: str = "", prompt: str = f"a photo of a {TOKEN}") -> Path:
    """Encode a 32 px photo and invert it in 2 steps on ``tiny`` with ``prompt``."""
    return invert_recipe(folder, model_lines=embeddings, prompt=prompt)


def entry(file: str, token: str | None = None) -> str:
    return f'[[model.embedding]]\npath = "{file}"\n' + (f'token = "{token}"\n' if token else "")


def text_parts(path: Path, cache: Cache) -> tuple:
    plan = plan_recipe(path, cache=cache)
    registry = RunModels(plan.models, device=torch.device("cpu"), dtype=torch.float32,
                         models_dir=models_dir_for(cache)).registry("model.id")  # fmt: skip
    return plan, registry.get("tokenizer"), registry.get("text_encoder")


@pytest.mark.parametrize(
    ("name", "contents", "token"),
    [
        ("learned_embeds.safetensors", "diffusers", None),  # diffusers' {token: vector}
        ("learned_embeds.bin", "diffusers", None),
        ("a1111.pt", "a1111", TOKEN),  # AUTOMATIC1111's string_to_param, renamed
    ],
)
def test_the_files_token_encodes_to_its_vector(
    name: str, contents: str, token: str | None, tmp_path: Path
) -> None:
    learned = vector(0)
    if contents == "diffusers" and name.endswith(".safetensors"):
        save_file({TOKEN: learned}, tmp_path / name)
    elif contents == "diffusers":
        torch.save({TOKEN: learned}, tmp_path / name)
    else:
        torch.save({"string_to_param": {"*": learned[None]}, "name": "cat", "step": 500},
                   tmp_path / name)  # fmt: skip
    _, tokenizer, encoder = text_parts(recipe(tmp_path, entry(name, token)), Cache(tmp_path / "c"))
    ids = tokenizer("a photo of a <cat-toy>").input_ids
    token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    assert token_id == TINY_COMPONENTS["text_encoder"].config["vocab_size"]  # one new row
    assert ids.count(token_id) == 1
    assert torch.equal(encoder.get_input_embeddings().weight[token_id], learned)
    # The prompt conditions on the vector: another vector, another encoding.
    encoded = encode_prompts(tokenizer, encoder, ["a photo of a <cat-toy>"])
    with torch.no_grad():
        encoder.get_input_embeddings().weight[token_id] = vector(1)
    assert not torch.allclose(
        encoded, encode_prompts(tokenizer, encoder, ["a photo of a <cat-toy>"])
    )


def test_embeddings_enter_the_keys_and_a_recipe_prompt_runs_with_the_token(tmp_path: Path) -> None:
    save_file({TOKEN: vector(0)}, tmp_path / "a.safetensors")
    save_file({TOKEN: vector(1)}, tmp_path / "b.safetensors")
    cache = Cache(tmp_path / "c")
    base = plan_recipe(recipe(tmp_path, prompt="a photo of a cat"), cache=cache)
    with_a = plan_recipe(recipe(tmp_path, entry("a.safetensors")), cache=cache)
    with_b = plan_recipe(recipe(tmp_path, entry("b.safetensors")), cache=cache)
    digest = hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    adapters = with_a.stages["invert"].preimage["models"]["model.id"]["adapters"]
    assert adapters == [{"embedding": digest, "token": TOKEN}]
    assert len({plan.stages["invert"].key for plan in (base, with_a, with_b)}) == 3
    # The VAE's encoding does not read a prompt: one key with any embedding.
    assert len({plan.stages["encode"].key for plan in (base, with_a, with_b)}) == 1
    result = run_recipe(recipe(tmp_path, entry("a.safetensors")), cache=cache, out_dir=None,
                        device="cpu")  # fmt: skip
    # The inversion conditioned on the prompt with the token's vector in it.
    registry = result.registry.registry("model.id")
    tokenizer, encoder = registry.get("tokenizer"), registry.get("text_encoder")
    assert tokenizer.convert_tokens_to_ids(TOKEN) in tokenizer(f"a photo of a {TOKEN}").input_ids
    stored = cache.get(result.keys["invert"]).tensor("prompt_embeds")
    assert torch.equal(stored, encode_prompts(tokenizer, encoder, [f"a photo of a {TOKEN}"]))


def test_a_multi_vector_token_encodes_as_diffusers_pipeline_encodes_it(
    tmp_path: Path, tiny_folder: Path
) -> None:
    """A 3-vector file adds <t>, <t>_1 and <t>_2; a prompt naming <t> conditions on all three
    rows, as StableDiffusionPipeline's encode_prompt (after load_textual_inversion) does."""
    from diffusers import StableDiffusionPipeline

    vectors = torch.stack([vector(seed) for seed in (3, 4, 5)])
    save_file({TOKEN: vectors}, tmp_path / "multi.safetensors")
    prompt = f"a photo of a {TOKEN} on a table"
    cache = Cache(tmp_path / "c")
    result = run_recipe(recipe(tmp_path, entry("multi.safetensors"), prompt=prompt),
                        cache=cache, out_dir=None, device="cpu")  # fmt: skip
    stored = cache.get(result.keys["invert"]).tensor("prompt_embeds")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    pipe.load_textual_inversion(str(tmp_path / "multi.safetensors"))
    expected, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    torch.testing.assert_close(stored, expected, rtol=0, atol=1e-6)
    registry = result.registry.registry("model.id")
    rows = registry.get("text_encoder").get_input_embeddings().weight
    tokenizer = registry.get("tokenizer")
    ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"])
    torch.testing.assert_close(rows[ids], vectors, rtol=0, atol=0)
    # Not rewritten, the prompt would condition on <t>'s first vector alone.
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    first_only = registry.get("text_encoder")(ids)[0]
    assert not torch.allclose(stored, first_only, atol=1e-3)


def test_a_token_a_multi_vector_file_adds_cannot_be_added_again(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_file({TOKEN: torch.stack([vector(0), vector(1)])}, tmp_path / "multi.safetensors")
    save_file({f"{TOKEN}_1": vector(2)}, tmp_path / "one.safetensors")
    path = recipe(tmp_path, entry("multi.safetensors") + entry("one.safetensors"))
    assert main(["validate", str(path), "--cache", str(tmp_path / "c")]) == 2
    assert f"model.embedding[1].token: token '{TOKEN}_1' is added twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda folder: None,
         "model.embedding[0].path: file not found: e.safetensors (relative paths start at the"
         " recipe's folder)"),
        (lambda folder: save_file({TOKEN: vector(0, 24)}, folder / "e.safetensors"),
         f"model.embedding[0].path: e.safetensors holds a vector of 24 numbers but the model's"
         f" text encoder embeds tokens in {WIDTH} (use an embedding trained for this model)"),
        (lambda folder: save_file({"emb_params": torch.zeros(1, WIDTH)}, folder / "e.safetensors"),
         "model.embedding[0].path: the file names no token: set token (for example"
         " '<my-concept>')"),
    ],
    ids=["missing", "wrong-width", "no-token"],
)  # fmt: skip
def test_an_unusable_embedding_file_is_one_line_naming_its_entry(
    make, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make(tmp_path)
    path = recipe(tmp_path, entry("e.safetensors"))
    assert main(["validate", str(path), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == f"{path}:2: {expected}"


class Payload:
    """Not a tensor: unpickling it would run a constructor."""


def test_a_bin_file_is_read_with_weights_only(tmp_path: Path) -> None:
    torch.save({TOKEN: Payload()}, tmp_path / "e.bin")
    with pytest.raises(ModelUnavailableError, match=r"model\.embedding\[0\]\.path: e\.bin cannot be"
                       r" read with torch\.load\(weights_only=True\)"):  # fmt: skip
        plan_recipe(recipe(tmp_path, entry("e.bin")), cache=Cache(tmp_path / "c"))


def test_a_token_already_in_the_vocabulary_is_refused_when_it_loads(tmp_path: Path) -> None:
    save_file({"cat</w>": vector(0)}, tmp_path / "e.safetensors")
    with pytest.raises(ModelUnavailableError, match=r"model\.embedding\[0\]\.token: token "
                       r"'cat</w>' is already in the model's vocabulary"):  # fmt: skip
        text_parts(recipe(tmp_path, entry("e.safetensors")), Cache(tmp_path / "c"))
