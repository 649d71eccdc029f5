"""LoRA files (``[[model.lora]]``): fused at their scale, in the keys, clean between recipes."""

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
from editflow.models.adapters import apply_adapters
from editflow.stages.diffusion import encode_prompts_once

RANK = 4
_UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_factors(module: torch.nn.Module, prefix: str, ends: tuple[str, ...], seed: int) -> dict:
    """Random rank-4 factors for every linear layer of ``module`` whose name ends in ``ends``,
    named as diffusers' ``save_lora_weights`` names them (``unet.<layer>.lora_A.weight``)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in module.named_modules():
        if name.endswith(ends) and isinstance(layer, torch.nn.Linear):
            a = torch.randn(RANK, layer.in_features, generator=generator) * 0.1
            b = torch.randn(layer.out_features, RANK, generator=generator) * 0.1
            factors[f"{prefix}.{name}.lora_A.weight"] = a
            factors[f"{prefix}.{name}.lora_B.weight"] = b
    return factors


@pytest.fixture(scope="module")
def base_parts(tiny_folder: Path) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {
        "unet": UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder"),
    }


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory, base_parts: dict) -> Path:
    """A recipe folder with a UNet LoRA, another one, and a text-encoder LoRA for ``tiny``."""
    folder = tmp_path_factory.mktemp("lora")
    save_file(
        lora_factors(base_parts["unet"], "unet", _UNET_PROJECTIONS, 0), folder / "a.safetensors"
    )
    save_file(
        lora_factors(base_parts["unet"], "unet", _UNET_PROJECTIONS, 1), folder / "b.safetensors"
    )
    text = lora_factors(base_parts["text_encoder"], "text_encoder", _TEXT_PROJECTIONS, 2)
    save_file(text, folder / "text.safetensors")
    return folder


def recipe(folder: Path, name: str, lora: str = "") -> Path:
    """Encode a 32 px photo and invert it in 2 steps on ``tiny``, with ``lora`` entries."""
    return invert_recipe(folder, model_lines=lora, name=name)


def lora_entry(file: str, scale: float | None = None, name: str | None = None) -> str:
    lines = f'[[model.lora]]\npath = "{file}"\n'
    lines += f"scale = {scale}\n" if scale is not None else ""
    return lines + (f'adapter_name = "{name}"\n' if name else "")


def test_lora_fuses_w_plus_scale_times_ba_into_the_unet_and_nothing_else(
    lora_folder: Path, base_parts: dict, tmp_path: Path
) -> None:
    plan = plan_recipe(
        recipe(lora_folder, "half.toml", lora_entry("a.safetensors", 0.5)), cache=Cache(tmp_path)
    )
    models = RunModels(plan.models, device=torch.device("cpu"), dtype=torch.float32,
                       models_dir=models_dir_for(Cache(tmp_path)))  # fmt: skip
    unet = models.registry("model.id").get("unet")
    factors = lora_factors(base_parts["unet"], "unet", _UNET_PROJECTIONS, 0)
    base = base_parts["unet"].state_dict()
    fused = unet.state_dict()
    assert fused.keys() == base.keys()  # no peft layer is left behind
    changed = {name.removeprefix("unet.").replace(".lora_A.weight", ".weight")
               for name in factors if name.endswith("lora_A.weight")}  # fmt: skip
    assert len(changed) == 32
    for name, weight in base.items():
        if name in changed:
            layer = name.removesuffix(".weight")
            delta = factors[f"unet.{layer}.lora_B.weight"] @ factors[f"unet.{layer}.lora_A.weight"]
            # alpha defaults to the rank, so alpha / r = 1: W + 0.5 * B A
            torch.testing.assert_close(fused[name], weight + 0.5 * delta, rtol=0, atol=1e-6)
            assert not torch.equal(fused[name], weight)
        else:
            assert torch.equal(fused[name], weight), name


def test_scale_zero_gives_the_base_bytes_another_scale_others_and_recipes_share_no_weights(
    lora_folder: Path, tmp_path: Path
) -> None:
    # One process, models handed from run to run (as figures and sweeps do): LoRA first,
    # then the base model, which must not see the LoRA's fused weights.
    half = recipe(lora_folder, "half.toml", lora_entry("a.safetensors", 0.5))
    base = recipe(lora_folder, "base.toml")
    zero = recipe(lora_folder, "zero.toml", lora_entry("a.safetensors", 0.0))
    runs, registry = {}, None
    for name, path in (("half", half), ("base", base), ("zero", zero)):
        cache = Cache(tmp_path / name)
        result = run_recipe(path, cache=cache, out_dir=None, device="cpu", registry=registry)
        registry = result.registry
        runs[name] = {stage: cache.get(key).tensor("latents") for stage, key in result.keys.items()}
        runs[name]["keys"] = result.keys
    assert torch.equal(runs["zero"]["invert"], runs["base"]["invert"])
    assert not torch.allclose(runs["half"]["invert"], runs["base"]["invert"], atol=1e-3)
    # The VAE is not changed by a LoRA: the same encoding under every recipe.
    assert torch.equal(runs["half"]["encode"], runs["base"]["encode"])
    keys = [runs[name]["keys"]["invert"] for name in ("half", "base", "zero")]
    assert len(set(keys)) == 3


def test_keys_change_with_the_scale_and_the_file_and_record_both(
    lora_folder: Path, tmp_path: Path
) -> None:
    cache = Cache(tmp_path)

    def plan_with(lora: str) -> dict:
        path = recipe(lora_folder, "r.toml", lora)
        return {
            name: stage.preimage for name, stage in plan_recipe(path, cache=cache).stages.items()
        }

    base = plan_with("")
    half = plan_with(lora_entry("a.safetensors", 0.5, name="style"))
    renamed = plan_with(lora_entry("a.safetensors", 0.5, name="other"))
    more = plan_with(lora_entry("a.safetensors", 0.75))
    other = plan_with(lora_entry("b.safetensors", 0.5))
    digest = hashlib.sha256((lora_folder / "a.safetensors").read_bytes()).hexdigest()
    assert half["invert"]["models"]["model.id"]["adapters"] == [{"lora": digest, "scale": 0.5}]
    # Without LoRA nothing is added: the keys recipes had before LoRA existed stay.
    assert "adapters" not in base["invert"]["models"]["model.id"]
    assert half == renamed  # the adapter's name is not what it computes
    keys = {str(plan["invert"]) for plan in (base, half, more, other)}
    assert len(keys) == 4


def test_a_lora_gives_new_keys_only_to_stages_using_a_part_it_changes(
    lora_folder: Path, tmp_path: Path
) -> None:
    """A UNet LoRA reaches the inversion's key, not the VAE's encoding nor a text-encoder
    stage's; a text-encoder LoRA reaches the text stage too; a rerun with a LoRA added
    finds the encoding in the cache."""
    cache = Cache(tmp_path / "c")
    bank = '[stages.bank]\nkind = "direction.bank_mean"\nword = "cat"\n'

    def plan_with(name: str, lora: str = "") -> dict[str, str]:
        path = recipe(lora_folder, name, lora)
        path.write_text(path.read_text() + bank)
        return {name: stage.key for name, stage in plan_recipe(path, cache=cache).stages.items()}

    base = plan_with("base.toml")
    unet = plan_with("unet.toml", lora_entry("a.safetensors"))
    text = plan_with("text.toml", lora_entry("text.safetensors"))
    assert unet["encode"] == text["encode"] == base["encode"]
    assert unet["bank"] == base["bank"] != text["bank"]
    assert len({base["invert"], unet["invert"], text["invert"]}) == 3
    run_recipe(recipe(lora_folder, "base.toml"), cache=cache, out_dir=None, device="cpu")
    result = run_recipe(recipe(lora_folder, "unet.toml", lora_entry("a.safetensors")),
                        cache=cache, out_dir=None, device="cpu")  # fmt: skip
    assert (result.hits, result.computed) == (["encode"], ["invert"])


def test_a_text_encoder_lora_changes_encodings_and_no_memo_answers_with_old_ones(
    lora_folder: Path, tmp_path: Path
) -> None:
    plan = plan_recipe(
        recipe(lora_folder, "text.toml", lora_entry("text.safetensors", 1.0)), cache=Cache(tmp_path)
    )
    base_plan = plan_recipe(recipe(lora_folder, "base.toml"), cache=Cache(tmp_path))
    models_dir = models_dir_for(Cache(tmp_path))
    base = RunModels(base_plan.models, device=torch.device("cpu"), dtype=torch.float32,
                     models_dir=models_dir).registry("model.id")  # fmt: skip
    tokenizer, encoder = base.get("tokenizer"), base.get("text_encoder")
    before = encode_prompts_once(tokenizer, encoder, ["a photo of a cat"])
    # The same encoder object changed in place: the memo must not answer from before.
    apply_adapters(plan.models["model.id"], {"text_encoder": encoder})
    after = encode_prompts_once(tokenizer, encoder, ["a photo of a cat"])
    fresh = RunModels(plan.models, device=torch.device("cpu"), dtype=torch.float32,
                      models_dir=models_dir).registry("model.id")  # fmt: skip
    expected = encode_prompts_once(fresh.get("tokenizer"), fresh.get("text_encoder"),
                                   ["a photo of a cat"])  # fmt: skip
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda folder: None,
         "model.lora[0].path: file not found: l.safetensors (relative paths start at the"
         " recipe's folder)"),
        (lambda folder: save_file({"conv.weight": torch.zeros(2)}, folder / "l.safetensors"),
         "model.lora[0].path: l.safetensors is not a LoRA: 1 tensor names lack 'lora'"
         " (such as 'conv.weight')"),
        (lambda folder: (folder / "l.safetensors").write_bytes(b"not a file"),
         "model.lora[0].path: l.safetensors is not a safetensors file: Error while"
         " deserializing header: header too large"),
        (lambda folder: save_file({"vae.x.lora_A.weight": torch.zeros(2)},
                                  folder / "l.safetensors"),
         "model.lora[0].path: l.safetensors is not a LoRA of a Stable Diffusion UNet or text"
         " encoder: no tensor name starts with 'unet.', 'lora_unet_', 'text_encoder.',"
         " 'lora_te_'"),
    ],
    ids=["missing", "not-a-lora", "not-safetensors", "other-part"],
)  # fmt: skip
def test_a_missing_or_non_lora_file_is_one_line_naming_its_entry(
    make, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make(tmp_path)
    path = recipe(tmp_path, "r.toml", lora_entry("l.safetensors"))
    assert main(["validate", str(path), "--cache", str(tmp_path / "c")]) == 2
    # The line is [model]'s: the TOML locator knows no [i] in keys (editflow/documents.py).
    assert capsys.readouterr().err.strip() == f"{path}:2: {expected}"


def test_pickled_lora_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "l.bin").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match=r"model\.lora\[0\]\.path: l\.bin: LoRA weights"
                       r" are read from \.safetensors files only"):  # fmt: skip
        plan_recipe(recipe(tmp_path, "r.toml", lora_entry("l.bin")), cache=Cache(tmp_path / "c"))
