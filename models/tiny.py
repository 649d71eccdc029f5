"""The built-in ``tiny`` model: Stable-Diffusion-shaped components small enough for a CPU.

The components are created from the configs below with a fixed seed, saved once in the
ordinary diffusers layout (``model_index.json`` plus one subfolder per component, safetensors
weights, as ``StableDiffusionPipeline.save_pretrained`` writes them) and from then on loaded
through the same ``from_pretrained`` path as any real model. Their images look like noise;
what matters is that every shape, class and code path is the real one.

The folder is named by a hash of :func:`tiny_identity`, so changing a config or the builder
gives a new folder instead of silently reusing stale weights. To add a component (a BLIP
captioner, CLIP vision, a ControlNet, a pixel-space UNet), add one entry to
``TINY_COMPONENTS``, one builder to ``_BUILDERS`` and bump ``TINY_BUILDER_VERSION``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Any

from editflow.models.identity import quiet_libraries

# Bumped whenever the build changes the weights or files for the same configs.
TINY_BUILDER_VERSION = 3  # 2: tokenizer merges weighted by word rank
TINY_SEED = 0

_TEXT_DIM = 32  # text-encoder width == UNet cross-attention width, like SD's 768
_VOCAB_SIZE = 1000
_MAX_TOKENS = 77
_BOS_ID = _VOCAB_SIZE - 2  # like CLIP, the two special tokens close the vocabulary
_EOS_ID = _VOCAB_SIZE - 1

# Common English and image-description words, most common first (the order sets each
# word's weight); byte-pair merges are learned from them so that prompts tokenize into
# words and word pieces instead of single bytes.
_MERGE_CORPUS = """
a an the of and or in on at to with from by for as is are was be it its this that these
those there here not no yes all any some many much more most few one two three four five
six seven eight nine ten first second last new old young big small large little tiny huge
long short tall high low wide narrow round square left right top bottom front back side
middle center near far inside outside above below under over behind between next up down
red orange yellow green blue purple pink brown black white gray grey gold silver dark light
bright pale colorful golden wooden metal glass stone paper plastic leather cotton wool
photo photograph picture image painting drawing sketch portrait landscape illustration
render rendering style art artist artwork oil watercolor pencil charcoal digital cartoon
anime realistic photorealistic detailed sharp blurry soft hard smooth rough shiny matte
cat cats dog dogs horse horses bird birds fish cow sheep lion tiger bear wolf fox rabbit
mouse elephant giraffe zebra monkey owl eagle duck chicken kitten puppy animal animals
man woman men women person people boy girl child children baby face faces hair eyes nose
mouth smile smiling hand hands head body wearing hat glasses shirt dress jacket coat shoes
astronaut robot knight king queen soldier doctor chef farmer
tree trees forest flower flowers grass leaf leaves garden field mountain mountains hill
river lake sea ocean beach sand desert snow ice rain cloud clouds sky sun moon star stars
city street road house houses building buildings tower bridge castle church village room
kitchen table chair bed window door wall floor roof car cars bus train boat ship plane
bicycle rocket coffee cup mug tea bowl plate food fruit apple apples orange banana cake
bread pizza book books lamp clock bottle vase box ball toy sign
sitting standing running walking flying swimming jumping eating drinking holding looking
playing sleeping reading riding smiling made covered filled painted lit
morning evening night sunset sunrise summer winter spring autumn day light shadow
beautiful pretty cute ugly happy sad angry calm quiet old fashioned modern ancient vintage
very quite highly ultra best quality high resolution masterpiece trending professional
""".split()


@dataclass(frozen=True)
class TinyComponent:
    """One component of the tiny model.

    Attributes:
        library: The library the class comes from (``diffusers`` or ``transformers``), as
            written in ``model_index.json``.
        class_name: The class name, as written in ``model_index.json``.
        config: The constructor config (read-only; lists are tuples).
    """

    library: str
    class_name: str
    config: Mapping[str, Any]


TINY_COMPONENTS: Mapping[str, TinyComponent] = MappingProxyType(
    {
        "unet": TinyComponent(
            "diffusers",
            "UNet2DConditionModel",
            MappingProxyType(
                {
                    "sample_size": 8,  # 8x8 latents: 64 px images by default
                    "in_channels": 4,
                    "out_channels": 4,
                    "layers_per_block": 1,
                    "block_out_channels": (32, 64),
                    # SD's pattern cut to two levels: cross-attention at 8x8 (down 0, up 1)
                    # and at 4x4 (the mid block).
                    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
                    "cross_attention_dim": _TEXT_DIM,
                    # diffusers' SD UNets read this as the number of heads.
                    "attention_head_dim": 4,
                    "norm_num_groups": 8,
                }
            ),
        ),
        "vae": TinyComponent(
            "diffusers",
            "AutoencoderKL",
            MappingProxyType(
                {
                    "sample_size": 64,
                    "in_channels": 3,
                    "out_channels": 3,
                    # Four blocks, three downsamplings: a factor of 8 like SD's VAE.
                    "down_block_types": ("DownEncoderBlock2D",) * 4,
                    "up_block_types": ("UpDecoderBlock2D",) * 4,
                    "block_out_channels": (16, 32, 32, 32),
                    "layers_per_block": 1,
                    "latent_channels": 4,
                    "norm_num_groups": 8,
                    # SD picked 0.18215 so that its latents have unit variance; the random
                    # tiny VAE's posterior means have a std of about 0.25 on photos, so 4.0
                    # does the same job (DDIM round trips and noise maps then have SD scale).
                    "scaling_factor": 4.0,
                }
            ),
        ),
        "text_encoder": TinyComponent(
            "transformers",
            "CLIPTextModel",
            MappingProxyType(
                {
                    "hidden_size": _TEXT_DIM,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 37,
                    "projection_dim": _TEXT_DIM,
                    "vocab_size": _VOCAB_SIZE,
                    "max_position_embeddings": _MAX_TOKENS,
                    # The pooled output is read at the EOS token, so the ids must match.
                    "bos_token_id": _BOS_ID,
                    "eos_token_id": _EOS_ID,
                    "pad_token_id": _EOS_ID,
                }
            ),
        ),
        "tokenizer": TinyComponent(
            "transformers",
            "CLIPTokenizer",
            MappingProxyType(
                {
                    "vocab_size": _VOCAB_SIZE,
                    "model_max_length": _MAX_TOKENS,
                    "merge_corpus_sha256": hashlib.sha256(
                        " ".join(_MERGE_CORPUS).encode()
                    ).hexdigest(),
                }
            ),
        ),
        # Spelled out in full (not left to diffusers' defaults) so the identity pins every
        # number the sampler uses; SD 1.x values.
        "scheduler": TinyComponent(
            "diffusers",
            "DDIMScheduler",
            MappingProxyType(
                {
                    "num_train_timesteps": 1000,
                    "beta_start": 0.00085,
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "trained_betas": None,
                    "clip_sample": False,
                    "set_alpha_to_one": False,
                    "steps_offset": 1,
                    "prediction_type": "epsilon",
                    "thresholding": False,
                    "dynamic_thresholding_ratio": 0.995,
                    "clip_sample_range": 1.0,
                    "sample_max_value": 1.0,
                    "timestep_spacing": "leading",
                    "rescale_betas_zero_snr": False,
                }
            ),
        ),
        # pix2pix-zero's captioner: a BLIP with a WordPiece vocabulary of the words above.
        # Saved as one folder holding the model and its processor; not a pipeline part.
        "captioner": TinyComponent(
            "transformers",
            "BlipForConditionalGeneration",
            MappingProxyType(
                {
                    "image_size": 32,
                    "vision": MappingProxyType(
                        {
                            "hidden_size": _TEXT_DIM,
                            "intermediate_size": 37,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 4,
                            "image_size": 32,
                            "patch_size": 8,
                        }
                    ),
                    "text": MappingProxyType(
                        {
                            "hidden_size": _TEXT_DIM,
                            "intermediate_size": 37,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 4,
                            "encoder_hidden_size": _TEXT_DIM,
                            "max_position_embeddings": 64,
                        }
                    ),
                    "vocab_sha256": hashlib.sha256(" ".join(_MERGE_CORPUS).encode()).hexdigest(),
                }
            ),
        ),
        # A CLIP (text and vision towers) for scoring images against prompts, saved as one
        # folder with its processor (tiny's tokenizer, CLIP's image preprocessing).
        "clip": TinyComponent(
            "transformers",
            "CLIPModel",
            MappingProxyType(
                {
                    "projection_dim": _TEXT_DIM,
                    "image_size": 32,
                    "text": MappingProxyType(
                        {
                            "hidden_size": _TEXT_DIM,
                            "intermediate_size": 37,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 4,
                            "vocab_size": _VOCAB_SIZE,
                            "max_position_embeddings": _MAX_TOKENS,
                            "bos_token_id": _BOS_ID,
                            "eos_token_id": _EOS_ID,
                            "pad_token_id": _EOS_ID,
                        }
                    ),
                    "vision": MappingProxyType(
                        {
                            "hidden_size": _TEXT_DIM,
                            "intermediate_size": 37,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 4,
                            "image_size": 32,
                            "patch_size": 8,
                        }
                    ),
                }
            ),
        ),
        # A ControlNet shaped like the UNet above (its encoder half), for pose guidance.
        "controlnet": TinyComponent(
            "diffusers",
            "ControlNetModel",
            MappingProxyType(
                {
                    "in_channels": 4,
                    "layers_per_block": 1,
                    "block_out_channels": (32, 64),
                    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                    "cross_attention_dim": _TEXT_DIM,
                    "attention_head_dim": 4,
                    "norm_num_groups": 8,
                    # Three downsamplings: 64 px condition images to 8x8 latents.
                    "conditioning_embedding_out_channels": (16, 32, 32, 32),
                }
            ),
        ),
        # Later: "pixel_unet".
    }
)
# The parts StableDiffusionPipeline knows; the others are editflow's extras in the folder.
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Helper models kept in tiny's folder next to the pipeline (not in its model_index.json): the
# tiny parts of the helper providers (editflow.models.providers.PROVIDER_TABLE).
_HELPERS = tuple(name for name in TINY_COMPONENTS if name not in _PIPELINE_PARTS)
_ABSENT_PIPELINE_PARTS = ("feature_extractor", "image_encoder", "safety_checker")


@dataclass(frozen=True)
class TinyVariant:
    """One built-in model: its components and the diffusers pipeline class that loads it.

    Attributes:
        components: Component name -> how to build it.
        pipeline: Written to ``model_index.json`` so that pipeline loads the folder as is.
    """

    components: Mapping[str, TinyComponent]
    pipeline: str


# The inpainting variant is laid out as Stable Diffusion's inpainting model: its UNet takes
# 9 channels (the noisy latent, the mask and the masked image's latent) and there is no
# captioner (tiny's serves both).
_INPAINT_UNET = TinyComponent(
    "diffusers",
    "UNet2DConditionModel",
    MappingProxyType({**TINY_COMPONENTS["unet"].config, "in_channels": 9}),
)
# Stable Diffusion 1.5's full-size configs with random weights: for timing and memory on a
# GPU, never for quality. The tokenizer is tiny's (its ids fit the full-size embedding).
_SD15_SHAPED = MappingProxyType(
    {
        "unet": TinyComponent(
            "diffusers",
            "UNet2DConditionModel",
            MappingProxyType(
                {
                    "sample_size": 64,
                    "in_channels": 4,
                    "out_channels": 4,
                    "layers_per_block": 2,
                    "block_out_channels": (320, 640, 1280, 1280),
                    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    "cross_attention_dim": 768,
                    "attention_head_dim": 8,
                }
            ),
        ),
        "vae": TinyComponent(
            "diffusers",
            "AutoencoderKL",
            MappingProxyType(
                {
                    "sample_size": 512,
                    "in_channels": 3,
                    "out_channels": 3,
                    "down_block_types": ("DownEncoderBlock2D",) * 4,
                    "up_block_types": ("UpDecoderBlock2D",) * 4,
                    "block_out_channels": (128, 256, 512, 512),
                    "layers_per_block": 2,
                    "latent_channels": 4,
                    "scaling_factor": 0.18215,
                }
            ),
        ),
        "text_encoder": TinyComponent(
            "transformers",
            "CLIPTextModel",
            MappingProxyType(
                {
                    "hidden_size": 768,
                    "num_hidden_layers": 12,
                    "num_attention_heads": 12,
                    "intermediate_size": 3072,
                    "projection_dim": 768,
                    "vocab_size": 49408,
                    "max_position_embeddings": _MAX_TOKENS,
                    "hidden_act": "quick_gelu",
                    "bos_token_id": _BOS_ID,
                    "eos_token_id": _EOS_ID,
                    "pad_token_id": _EOS_ID,
                }
            ),
        ),
        "tokenizer": TINY_COMPONENTS["tokenizer"],
        "scheduler": TINY_COMPONENTS["scheduler"],
    }
)
# A pixel-space DDPM model as DiffusionCLIP uses (google/ddpm-* layout): an unconditional
# UNet2DModel on 64 px images and a DDIM scheduler with DDPM's linear betas 1e-4 to 0.02.
_PIXEL = MappingProxyType(
    {
        "unet": TinyComponent(
            "diffusers",
            "UNet2DModel",
            MappingProxyType(
                {
                    "sample_size": 64,
                    "in_channels": 3,
                    "out_channels": 3,
                    "layers_per_block": 1,
                    # Self-attention at 16x16, as DDPM's models have it.
                    "block_out_channels": (16, 32, 64),
                    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                    "attention_head_dim": 8,
                    "norm_num_groups": 8,
                }
            ),
        ),
        # tiny's DDIM scheduler with DDPM's betas; the final step lands on the clean image.
        "scheduler": TinyComponent(
            "diffusers",
            "DDIMScheduler",
            MappingProxyType(
                {
                    **TINY_COMPONENTS["scheduler"].config,
                    "beta_start": 0.0001,
                    "beta_end": 0.02,
                    "beta_schedule": "linear",
                    "set_alpha_to_one": True,
                    "steps_offset": 0,
                }
            ),
        ),
    }
)
# LPIPS (metric.lpips) is a helper with its own identity and folder, outside TINY_COMPONENTS:
# there it would enter tiny's identity, and so the cache key of every stage run on tiny.
TINY_LPIPS = TinyComponent(
    "editflow", "LpipsNetwork", MappingProxyType({"backbone": "tiny", "builder_version": 1})
)
TINY_LPIPS_ID = "tiny-lpips"


def tiny_lpips_identity() -> dict[str, Any]:
    """The built-in LPIPS network's identity (seed and config): cheap, builds nothing."""
    return {"seed": TINY_SEED, "config": jsonable(TINY_LPIPS.config)}


@functools.cache
def tiny_lpips_folder_name() -> str:
    """``tiny-lpips-<12 hex digits of sha256 over its identity>``."""
    canonical = json.dumps(tiny_lpips_identity(), sort_keys=True, separators=(",", ":"))
    return f"{TINY_LPIPS_ID}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def ensure_tiny_lpips(models_dir: Path) -> Path:
    """The built-in LPIPS network's folder under ``models_dir``, built first when missing."""
    final = Path(models_dir) / tiny_lpips_folder_name()
    return _build_once(final, "model.safetensors", _save_tiny_lpips)


def _save_tiny_lpips(folder: Path) -> None:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        network = _build_lpips(TINY_LPIPS.config)
    network.save_pretrained(folder)


def _build_lpips(config: Mapping[str, Any]) -> Any:
    import torch

    from editflow.models.lpips import LpipsNetwork

    network = LpipsNetwork(config["backbone"])
    # Trained LPIPS heads are non-negative (the paper clamps them), so distances are >= 0.
    with torch.no_grad():
        for head in network.lin:
            head.weight.abs_()
    return network


TINY_VARIANTS: Mapping[str, TinyVariant] = MappingProxyType(
    {
        "tiny": TinyVariant(TINY_COMPONENTS, "StableDiffusionPipeline"),
        "tiny-inpaint": TinyVariant(
            MappingProxyType(
                {
                    **{n: c for n, c in TINY_COMPONENTS.items() if n not in _HELPERS},
                    "unet": _INPAINT_UNET,
                }
            ),
            "StableDiffusionInpaintPipeline",
        ),
        "sd15-shaped": TinyVariant(_SD15_SHAPED, "StableDiffusionPipeline"),
        "tiny-pixel": TinyVariant(_PIXEL, "DDIMPipeline"),
    }
)


def jsonable(value: Any) -> Any:
    """Deep-copy a frozen config into plain JSON types (mappings to dicts, tuples to lists)."""
    if isinstance(value, Mapping):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [jsonable(item) for item in value]
    return value


@functools.cache  # every plan asks; the same object each time: read it, never change it
def tiny_identity(variant: str = "tiny") -> dict[str, Any]:
    """What a built-in model is, as JSON: builder version, seed and every component config.

    Cheap (builds and imports nothing), so cache keys and ``plan`` can use it.
    """
    identity: dict[str, Any] = {
        "builder_version": TINY_BUILDER_VERSION,
        "seed": TINY_SEED,
        "components": {
            name: {
                "library": component.library,
                "class_name": component.class_name,
                "config": jsonable(component.config),
            }
            for name, component in TINY_VARIANTS[variant].components.items()
        },
    }
    if variant != "tiny":  # tiny's identity predates variants and keeps its form
        identity["pipeline"] = TINY_VARIANTS[variant].pipeline
    return identity


@functools.cache  # a pure function of constants, asked by every plan
def tiny_folder_name(variant: str = "tiny") -> str:
    """The folder name ``<variant>-<12 hex digits of sha256 over the canonical identity>``."""
    canonical = json.dumps(tiny_identity(variant), sort_keys=True, separators=(",", ":"))
    return f"{variant}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def tiny_scheduler_config(variant: str = "tiny") -> dict[str, Any]:
    """A built-in variant's own scheduler config, as its ``scheduler/scheduler_config.json``
    holds it (with the class): ``tiny-pixel`` has DDPM's linear betas, the others Stable
    Diffusion's scaled-linear ones."""
    scheduler = TINY_VARIANTS[variant].components["scheduler"]
    return {"_class_name": scheduler.class_name, **jsonable(scheduler.config)}


def ensure_tiny(models_dir: Path, variant: str = "tiny") -> Path:
    """Return a built-in model's folder under ``models_dir``, building it first if missing.

    The build goes to a staging folder next to the final one and is published with one
    atomic ``os.rename``, so readers never see a half-written model and concurrent builders
    are safe: the first rename wins and the others discard their identical copy.

    Args:
        models_dir: Where built-in models live (created if missing).
        variant: ``tiny`` or ``tiny-inpaint`` (:data:`TINY_VARIANTS`).

    Returns:
        ``models_dir / tiny_folder_name(variant)``, a folder in the diffusers layout.
    """
    final = Path(models_dir) / tiny_folder_name(variant)
    return _build_once(final, "model_index.json", lambda staging: build_tiny(staging, variant))


def _build_once(final: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``final``, built by ``build(staging)`` and published by one atomic rename unless a
    file ``marker`` in it says it is there already."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    staging = final.parent / f".{final.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process published first (the target exists and is not empty).
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def build_tiny(folder: Path, variant: str = "tiny", only: Collection[str] | None = None) -> None:
    """Create every component of a built-in model from its config and save it under ``folder``.

    Each component is initialised under its own forked RNG seeded with ``TINY_SEED``, so the
    weights are the same on every build, do not depend on which other components exist,
    and the caller's global RNG state is left untouched.

    Args:
        folder: A new or empty folder to write to.
        variant: Which built-in model (:data:`TINY_VARIANTS`).
        only: Build just these components (``sd15-shaped``'s scheduler without its 4 GB of
            random weights, say); the folder then lacks ``model_index.json``.
    """
    import torch  # imported here: identity and planning must not pay for torch or diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, component in TINY_VARIANTS[variant].components.items():
        if only is not None and name not in only:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            built = _BUILDERS[name](component.config)
        _save(built, folder / name)
    if only is None:
        _write_model_index(folder, TINY_VARIANTS[variant])


def _save(component: Any, folder: Path) -> None:
    """Save one component the way a pipeline's ``save_pretrained`` does (safetensors)."""
    import torch

    if isinstance(component, tuple):  # a model and its processor share one folder
        for part in component:
            _save(part, folder)
    elif isinstance(component, torch.nn.Module):
        component.save_pretrained(folder, safe_serialization=True)
    else:
        component.save_pretrained(folder)


def _write_model_index(folder: Path, variant: TinyVariant) -> None:
    """Write ``model_index.json`` as ``DiffusionPipeline.save_pretrained`` formats it."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": variant.pipeline,
        "_diffusers_version": diffusers.__version__,
    }
    if variant.pipeline.startswith("StableDiffusion"):
        index["requires_safety_checker"] = False
        index.update({part: [None, None] for part in _ABSENT_PIPELINE_PARTS})
    index.update(
        {
            name: [variant.components[name].library, variant.components[name].class_name]
            for name in _PIPELINE_PARTS
            if name in variant.components
        }
    )
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (folder / "model_index.json").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Builders: one per component, config in, freshly initialised object out.


def _build_unet(config: Mapping[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel, UNet2DModel

    if "cross_attention_dim" not in config:  # a pixel-space, unconditional UNet
        return UNet2DModel(**jsonable(config))
    return UNet2DConditionModel(**jsonable(config))


def _build_vae(config: Mapping[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**jsonable(config))


def _build_text_encoder(config: Mapping[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**jsonable(config)))


def _build_tokenizer(config: Mapping[str, Any]) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(config["vocab_size"])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config["model_max_length"])


def _build_scheduler(config: Mapping[str, Any]) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**jsonable(config))


def captioner_tokenizer() -> Any:
    """The tiny captioner's WordPiece tokenizer, built without building the model."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = list(dict.fromkeys(specials + letters + _MERGE_CORPUS))
    vocab = {word: index for index, word in enumerate(words)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)


def _build_captioner(config: Mapping[str, Any]) -> Any:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tokenizer = captioner_tokenizer()
    vocab = tokenizer.get_vocab()
    size = config["image_size"]
    processor = BlipProcessor(image_processor=_blip_image_processor(size), tokenizer=tokenizer)
    text = dict(
        jsonable(config["text"]),
        vocab_size=len(vocab),
        pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[CLS]"],
        sep_token_id=vocab["[SEP]"],
        eos_token_id=vocab["[SEP]"],
    )
    blip = BlipConfig(
        text_config=text, vision_config=jsonable(config["vision"]), projection_dim=_TEXT_DIM
    )
    return BlipForConditionalGeneration(blip), processor


def _blip_image_processor(size: int) -> Any:
    # transformers >= 5 names the torchvision-free processor BlipImageProcessorPil.
    import transformers

    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    return cls(size={"height": size, "width": size})


def _build_clip(config: Mapping[str, Any]) -> Any:
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = _clip_vocab(_VOCAB_SIZE)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_TOKENS)
    size = config["image_size"]
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    clip = CLIPConfig(
        text_config=jsonable(config["text"]),
        vision_config=jsonable(config["vision"]),
        projection_dim=config["projection_dim"],
    )
    return CLIPModel(clip), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def _build_controlnet(config: Mapping[str, Any]) -> Any:
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(**jsonable(config))
    # A trained ControlNet starts from zero convolutions; random small ones give the tiny
    # model's pose guidance a visible effect, so tests can tell guided from unguided.
    for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        torch.nn.init.normal_(module.weight, std=0.05)
    torch.nn.init.normal_(controlnet.controlnet_cond_embedding.conv_out.weight, std=0.05)
    return controlnet


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "unet": _build_unet,
    "vae": _build_vae,
    "text_encoder": _build_text_encoder,
    "tokenizer": _build_tokenizer,
    "scheduler": _build_scheduler,
    "captioner": _build_captioner,
    "clip": _build_clip,
    "controlnet": _build_controlnet,
}


# ---------------------------------------------------------------------------------------
# The tokenizer's vocabulary: CLIP's byte-level BPE layout, learned from a fixed word list.


# Copied from openai/CLIP clip/simple_tokenizer.py (bytes_to_unicode), returning the values.
def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2 and CLIP use for the bytes, in CLIP's vocab order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-layout vocabulary of exactly ``vocab_size`` tokens, and its merges.

    Layout as in CLIP: the 256 byte characters, the same with ``</w>`` (word end), the
    tokens the merges create, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    chars = _bytes_to_unicode()
    tokens = chars + [char + "</w>" for char in chars]
    merges, merged_tokens = _learn_merges(_MERGE_CORPUS, vocab_size - len(tokens) - 2)
    tokens += merged_tokens + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {len(vocab)} tokens, expected {vocab_size}")
    return vocab, merges


def _learn_merges(words: Sequence[str], new_tokens: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Byte-pair encoding (Sennrich et al. 2016, Algorithm 1) over a fixed word list.

    Words are weighted by Zipf's law from their rank in the list (rank r weighs N / r), so
    the common words listed first become whole tokens. Each round merges the heaviest
    adjacent pair; ties go to the smallest pair, so the result never depends on hashing or
    dict order. Rounds continue until ``new_tokens`` distinct tokens exist (two pairs can
    spell the same token).

    Returns:
        The merges in rank order and the new tokens in order of creation.
    """
    unique_words = list(dict.fromkeys(words))
    weights = [len(unique_words) // rank + 1 for rank in range(1, len(unique_words) + 1)]
    corpus = [[*word[:-1], word[-1] + "</w>"] for word in unique_words]
    merges: list[tuple[str, str]] = []
    created: dict[str, None] = {}  # an ordered set
    while len(created) < new_tokens:
        pair_weights: Counter[tuple[str, str]] = Counter()
        for symbols, weight in zip(corpus, weights, strict=True):
            for pair in pairwise(symbols):
                pair_weights[pair] += weight
        if not pair_weights:
            raise RuntimeError(f"the merge corpus yields only {len(created)} tokens")
        best = min(pair_weights, key=lambda pair: (-pair_weights[pair], pair))
        merges.append(best)
        created[best[0] + best[1]] = None
        corpus = [_merge_pair(symbols, best) for symbols in corpus]
    return merges, list(created)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every adjacent occurrence of ``pair`` in ``symbols`` by its concatenation."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged
