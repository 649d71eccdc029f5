"""Single-file checkpoints: ``model.id = "./model.safetensors"`` with ``model.config``.

The test writes ``tiny``'s weights as one file in the original Stable Diffusion (LDM /
CompVis) key layout, the layout ``from_single_file`` converts from. The inverse mapping
(diffusers -> original) below is test-only support: written out from diffusers'
``single_file_utils`` (its ``DIFFUSERS_TO_LDM_MAPPING`` tables are used as they are) and
checked by converting back with diffusers' own ``convert_ldm_*`` functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file

from editflow.cache import Cache
from editflow.engine.api import plan_recipe, run_recipe
from editflow.errors import ModelUnavailableError
from editflow.models import ModelRegistry, ModelSection, layouts, resolve_providers

# ---------------------------------------------------------------------------------------
# diffusers -> original (LDM) keys, for tiny's configs

# A UNet resnet's parts: diffusers name -> original name (update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# A VAE attention's parts (update_vae_attentions_ldm_to_diffusers); weights were 1x1 convs.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def ldm_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original ``input_blocks`` /
    ``middle_block`` / ``output_blocks`` layout (without the ``model.diffusion_model.``)."""
    per_block = config["layers_per_block"] + 1  # resnets (+ a down/upsampler) per block
    has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]
    direct = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.", lambda b, j, part: f"input_blocks.{int(b) * per_block + int(j) + 1}.0.{_UNET_RESNET[part]}."),  # noqa: E501
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"input_blocks.{int(b) * per_block + int(j) + 1}.1."),  # noqa: E501
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda b: f"input_blocks.{(int(b) + 1) * per_block}.0.op."),  # noqa: E501
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.", lambda k, part: f"middle_block.{2 * int(k)}.{_UNET_RESNET[part]}."),  # noqa: E501
        (r"mid_block\.attentions\.0\.", lambda: "middle_block.1."),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.", lambda b, j, part: f"output_blocks.{int(b) * per_block + int(j)}.0.{_UNET_RESNET[part]}."),  # noqa: E501
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda b, j: f"output_blocks.{int(b) * per_block + int(j)}.1."),  # noqa: E501
        # After the block's last resnet, and after its attention when it has one.
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.", lambda b: f"output_blocks.{int(b) * per_block + per_block - 1}.{2 if has_attention[int(b)] else 1}.conv."),  # noqa: E501
    ]  # fmt: skip
    return {_rename(key, direct, rules): tensor for key, tensor in state.items()}


def ldm_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original ``encoder.down.i.block.j``
    layout (without the ``first_stage_model.``)."""
    last = len(config["up_block_types"]) - 1  # the original numbers decoder blocks upwards
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"encoder.down.{i}.block.{j}."),  # noqa: E501
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda i: f"encoder.down.{i}.downsample."),  # noqa: E501
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda i, j: f"decoder.up.{last - int(i)}.block.{j}."),  # noqa: E501
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda i: f"decoder.up.{last - int(i)}.upsample."),  # noqa: E501
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda side, k: f"{side}.mid.block_{int(k) + 1}."),  # noqa: E501
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.", lambda side, part: f"{side}.mid.attn_1.{_VAE_ATTENTION[part]}."),  # noqa: E501
    ]  # fmt: skip
    original = {}
    for key, tensor in state.items():
        name = _rename(key, direct, rules).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # a linear layer was a 1x1 convolution
        original[name] = tensor
    return original


def ldm_clip(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` state dict as the original keeps it under
    ``cond_stage_model.transformer.text_model.`` (the same names, one level down)."""
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def _rename(key: str, direct: dict[str, str], rules: list) -> str:
    if key in direct:
        return direct[key]
    for pattern, new in rules:
        if match := re.match(pattern, key):
            return new(*match.groups()) + key[match.end() :]
    raise AssertionError(f"no original name for {key}")


def write_single_file(tiny_folder: Path, path: Path, *, pickled: bool = False) -> dict:
    """``tiny``'s UNet, VAE and text encoder as one original-layout checkpoint at ``path``
    (safetensors, or ``torch.save`` under ``state_dict`` as training checkpoints keep it).

    Each part is converted back with diffusers' own functions and must come back exactly.
    """
    parts = {
        "unet": ("model.diffusion_model.", ldm_unet),
        "vae": ("first_stage_model.", ldm_vae),
        "text_encoder": ("cond_stage_model.transformer.text_model.", ldm_clip),
    }
    checkpoint: dict[str, torch.Tensor] = {}
    for component, (prefix, to_ldm) in parts.items():
        folder = tiny_folder / component
        weights = next(folder.glob("*.safetensors"))
        state = load_file(weights)
        config = json.loads((folder / "config.json").read_text())
        original = to_ldm(state, config)
        checkpoint.update({prefix + key: tensor for key, tensor in original.items()})
        back = from_ldm(component, checkpoint, config)
        assert sorted(back) == sorted(state), component
        assert all(torch.equal(back[key], state[key]) for key in state), component
    if pickled:
        torch.save({"state_dict": checkpoint, "global_step": 0}, path)
    else:
        save_file(checkpoint, path)
    return checkpoint


def from_ldm(component: str, checkpoint: dict, config: dict) -> dict[str, torch.Tensor]:
    """A component's diffusers state dict back from the original layout, by diffusers."""
    if component == "unet":
        return convert_ldm_unet_checkpoint(checkpoint, config)
    if component == "vae":
        return convert_ldm_vae_checkpoint(checkpoint, config)
    # transformers' CLIPTextModel keeps no "text_model." level any more
    clip = convert_ldm_clip_checkpoint(checkpoint)
    return {key.removeprefix("text_model."): tensor for key, tensor in clip.items()}


def copy_configs(tiny_folder: Path, target: Path) -> Path:
    """``tiny``'s diffusers folder without its weights: what model.config needs, and proof
    that the weights come from the checkpoint."""
    for path in tiny_folder.rglob("*.json"):
        (target / path.relative_to(tiny_folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.relative_to(tiny_folder))
    return target


@pytest.fixture(scope="module")
def single_file(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny as ``tiny.safetensors`` beside ``sd-config/`` (its configs, no weights)."""
    folder = tmp_path_factory.mktemp("single")
    write_single_file(tiny_folder, folder / "tiny.safetensors")
    copy_configs(tiny_folder, folder / "sd-config")
    return folder


RECIPE = """schema_version = 1
seed = 0
[model]
{model}
[inputs.photo]
image = "skimage:chelsea"
size = [32, 32]
[stages.encode]
kind = "encode.vae"
images = "inputs.photo"
[stages.invert]
kind = "invert.ddim"
latents = "encode.latents"
prompt = "a photo of a cat"
num_inference_steps = 3
[stages.edit]
kind = "sample.ddim"
latents = "invert.latents"
prompt = "a photo of a dog"
guidance_scale = 3.0
num_inference_steps = 3
[stages.decode]
kind = "decode.vae"
latents = "edit.latents"
"""


def write_recipe(folder: Path, model: str, name: str = "recipe.toml") -> Path:
    recipe = folder / name
    recipe.write_text(RECIPE.format(model=model))
    return recipe


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_single_file_checkpoint_gives_the_images_of_its_diffusers_folder(
    single_file: Path, tiny_folder: Path, tmp_path: Path
) -> None:
    # sd-config holds tiny's configs and no weights: the images can only come from the file.
    as_file = write_recipe(
        single_file, 'id = "./tiny.safetensors"\nconfig = "sd-config"', "file.toml"
    )
    as_tiny = write_recipe(single_file, 'id = "tiny"', "tiny.toml")
    images = {}
    for recipe in (as_tiny, as_file):
        cache = Cache(tmp_path / recipe.stem)
        result = run_recipe(recipe, cache=cache, out_dir=None, device="cpu")
        assert result.computed == ["encode", "invert", "edit", "decode"]
        images[recipe.stem] = cache.get(result.keys["decode"]).tensor("images")
    assert images["file"].shape == (1, 3, 32, 32)
    # Equal weights at other addresses round differently in CPU kernels' last bits (3e-6
    # here); 10% more in any one tensor of the file moves pixels by 1e-2 or more.
    torch.testing.assert_close(images["file"], images["tiny"], rtol=0, atol=1e-5)
    assert sorted(result.registry.loads) == [
        "model.id:text_encoder", "model.id:tokenizer", "model.id:unet", "model.id:vae"
    ]  # fmt: skip

    # The identity: the file's sha256 and that of the configs model_index.json lists.
    plan = plan_recipe(as_file, cache=Cache(tmp_path / "plan"))
    identity = plan.stages["edit"].preimage["models"]["model.id"]["identity"]
    assert identity == {
        "checkpoint_sha256": sha256(single_file / "tiny.safetensors"),
        "config": {
            "files": {name: sha256(single_file / "sd-config" / name) for name in PIPELINE_CONFIGS}
        },
    }


# tiny's configs that describe its pipeline (model_index.json names no captioner, clip ...).
PIPELINE_CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
]


class Spawn:
    """One that would run a shell command."""

    def __reduce__(self):
        return (os.system, ("true",))


class Payload:
    """An object a malicious checkpoint could carry: unpickling it would run code."""

    ran: list[str] = []

    def __reduce__(self):
        return (Payload.ran.append, ("unpickled",))


def test_a_ckpt_loads_through_weights_only_and_one_that_carries_code_is_refused(
    single_file: Path, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = write_single_file(tiny_folder, tmp_path / "tiny.ckpt", pickled=True)
    section = ModelSection(id="tiny.ckpt", config=str(tiny_folder))  # weights beside configs
    resolved = resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    model = resolved["model.id"]
    assert model.identity == {
        "checkpoint_sha256": sha256(tmp_path / "tiny.ckpt"),
        "config": {"files": {name: sha256(tiny_folder / name) for name in PIPELINE_CONFIGS}},
    }  # the folder's weights are not the model's: they count for nothing
    registry = ModelRegistry(
        model, device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    vae = registry.get("vae")
    expected = load_file(tiny_folder / "vae" / "diffusion_pytorch_model.safetensors")
    loaded = vae.state_dict()
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)

    torch.save({"state_dict": checkpoint, "callbacks": Payload()}, tmp_path / "evil.ckpt")
    section = ModelSection(id="./evil.ckpt", config=str(single_file / "sd-config"))
    hint = (" (use the model's .safetensors release, or convert the file to safetensors where"
            " you trust it)")  # fmt: skip
    # Planning reads the pickle's globals (getattr, to reach the list's append) and refuses.
    with pytest.raises(ModelUnavailableError) as error:
        resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    assert str(error.value) == (
        "model.id: refused to load checkpoint './evil.ckpt': it holds Python objects other "
        "than tensors (builtins.getattr), and editflow unpickles only tensors (torch.load with"
        " weights_only=True)" + hint
    )
    # What the scan lets through, torch.load(weights_only=True) refuses when it loads.
    monkeypatch.setattr(layouts, "foreign_globals", lambda *args: ())
    evil = resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    registry = ModelRegistry(
        evil["model.id"], device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    with pytest.raises(ModelUnavailableError) as error:
        registry.get("vae")
    assert str(error.value) == (
        "model.id: refused to load checkpoint './evil.ckpt': it holds Python objects other "
        "than tensors, and editflow unpickles only tensors (torch.load with weights_only=True)"
        + hint
    )
    assert Payload.ran == []


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "pre-1.6"])
def test_the_scan_names_what_a_checkpoint_would_import_and_unpickles_nothing(
    tmp_path: Path, protocol: int, zipped: bool
) -> None:
    """GLOBAL (protocol 2) and STACK_GLOBAL through the memo (4), in both torch.save formats;
    a Lightning-style checkpoint of tensors, an OrderedDict and a set passes."""
    from collections import OrderedDict

    from editflow.models.pickle_scan import foreign_globals

    tensors = OrderedDict(w=torch.zeros(2, 3), b=torch.ones(3).half())
    clean = {"state_dict": tensors, "epoch": 3, "tags": {"a", "b"}, "lr": 1e-4 + 2j}
    files = {}
    for name, value in {"clean": clean, "evil": {**clean, "cb": [Payload(), Payload()]},
                        "system": {"x": Spawn()}}.items():  # fmt: skip
        files[name] = tmp_path / f"{name}.ckpt"
        torch.save(value, files[name], pickle_protocol=protocol,
                   _use_new_zipfile_serialization=zipped)  # fmt: skip
    found = {name: foreign_globals(path, 0, 0) for name, path in files.items()}
    assert found == {"clean": (), "evil": ("builtins.getattr",), "system": ("posix.system",)}
    assert Payload.ran == []


def test_a_single_file_without_a_config_names_model_config(single_file: Path) -> None:
    recipe = write_recipe(single_file, 'id = "./tiny.safetensors"', "no_config.toml")
    with pytest.raises(ModelUnavailableError) as error:
        plan_recipe(recipe, cache=Cache(single_file / "c"))
    assert str(error.value) == (
        f"{recipe}:3: model.config: the single-file checkpoint './tiny.safetensors' needs the "
        "configs that describe it (set model.config to a diffusers folder (relative to the "
        "recipe) or to a hub id in the local Hugging Face cache, e.g. 'stable-diffusion-v1-5/"
        "stable-diffusion-v1-5' for a Stable Diffusion 1.5 checkpoint)"
    )


def test_a_config_hub_id_must_be_in_the_local_cache_and_is_identified_from_it(
    single_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    section = ModelSection(id="tiny.safetensors", config="someone/sd-config")
    with pytest.raises(ModelUnavailableError) as error:
        resolve_providers(section, ["model.id"], base_dir=single_file, models_dir=tmp_path)
    assert str(error.value) == (
        "model.config: config 'someone/sd-config' is not in the local Hugging Face cache "
        '(run \'hf download someone/sd-config --include "*.json" "*.txt"\' with network '
        "access (configs only), or set model.config to a local diffusers folder)"
    )

    # Cached as huggingface_hub lays it out: snapshot files link to blobs named by hash.
    commit, repo = "0123456789abcdef0123456789abcdef01234567", hub / "models--someone--sd-config"
    blobs = {}
    for path in sorted((single_file / "sd-config").rglob("*.json")):
        name = path.relative_to(single_file / "sd-config").as_posix()
        data = path.read_bytes()
        blobs[name] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's id
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blobs[name]).write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blobs[name], link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = resolve_providers(section, ["model.id"], base_dir=single_file, models_dir=tmp_path)[
        "model.id"
    ]
    assert model.folder == repo.resolve() / "snapshots" / commit
    assert model.identity["config"] == {
        "repo": "someone/sd-config",
        "commit": commit,
        "files": {
            name: blob
            for name, blob in blobs.items()
            if not name.startswith(("captioner", "clip", "controlnet"))
        },  # noqa: E501
    }
    assert model.scheduler_config["_class_name"] == "DDIMScheduler"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"hello", "'./notes.txt' is a file but not a single-file checkpoint "
         "(use a .safetensors (or .ckpt) checkpoint, or a folder in the diffusers layout)"),
        ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
         "'./junk.safetensors' is not a safetensors file: the header is not JSON"),
        ("junk.ckpt", b"PK? no, just text", "'./junk.ckpt' is not a PyTorch checkpoint"),
        ("missing.safetensors", None, "checkpoint './missing.safetensors' does not exist"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_is_refused_when_planning(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    section = ModelSection(id=f"./{name}", config="sd-config")
    with pytest.raises(ModelUnavailableError) as error:
        resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    assert str(error.value).startswith(f"model.id: {message}")


def test_a_lora_is_not_a_whole_model_and_config_is_only_for_single_files(
    tmp_path: Path,
) -> None:
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    section = ModelSection(id="lora.safetensors", config="sd-config")
    with pytest.raises(ModelUnavailableError) as error:
        resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    assert str(error.value) == (
        "model.id: 'lora.safetensors' holds no Stable Diffusion UNet in the original layout "
        "(no 'model.diffusion_model.*' tensors) (model.id takes a whole-pipeline checkpoint; "
        "a LoRA, a VAE or one component's weights are not one)"
    )
    section = ModelSection(id="tiny", config="sd-config")
    with pytest.raises(ModelUnavailableError) as error:
        resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    assert str(error.value) == (
        "model.config: is read only for a single-file checkpoint in model.id "
        "(remove it: model 'tiny' brings its own configs)"
    )


def test_a_part_the_checkpoint_lacks_is_an_error_never_weights_from_elsewhere(
    single_file: Path, tmp_path: Path
) -> None:
    state = load_file(single_file / "tiny.safetensors")
    del state["model.diffusion_model.out.2.weight"]  # the UNet's last convolution
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")},
              tmp_path / "part.safetensors")  # fmt: skip
    section = ModelSection(id="part.safetensors", config=str(single_file / "sd-config"))
    model = resolve_providers(section, ["model.id"], base_dir=tmp_path, models_dir=tmp_path)
    registry = ModelRegistry(
        model["model.id"], device=torch.device("cpu"), dtype=torch.float32, models_dir=tmp_path
    )
    messages = {}
    for component in ("unet", "text_encoder"):
        with pytest.raises(ModelUnavailableError) as error:
            registry.get(component)
        messages[component] = str(error.value)
    assert messages == {
        "unet": "model.id: model 'part.safetensors': the checkpoint lacks some of the 'unet' "
        "tensors its config calls for (check that model.config describes this checkpoint)",
        "text_encoder": "model.id: model 'part.safetensors': the checkpoint holds no weights "
        "for 'text_encoder' (CLIPTextModel) (editflow reads UNet, VAE and CLIP text encoder "
        "weights in the original Stable Diffusion layout from a single file)",
    }
    assert registry.loads == []


def test_the_scan_allows_outside_torch_exactly_what_weights_only_loading_allows() -> None:
    """A torch release that changes its allowlist must change the scan's with it: a stricter
    scan would refuse checkpoints torch loads."""
    from torch._weights_only_unpickler import _get_allowed_globals

    from editflow.models.pickle_scan import ALLOWED_OUTSIDE_TORCH

    outside = {name for name in _get_allowed_globals() if name.split(".")[0] != "torch"}
    assert outside == ALLOWED_OUTSIDE_TORCH
