"""Every bad input is refused before any compute: one located line, exit 2, nothing written.

Each case builds a recipe (a file of its own, or an example manifest with ``--set``
overrides) and states the exact message. None of them may leave a cache or output folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from support import MANIFESTS, RECIPES

from editflow.cli import main
from editflow.files.inputs import skimage_photos

OK = (RECIPES / "ok.toml").read_text()
TEXT_EDIT = MANIFESTS / "edit_friendly" / "text_edit.toml"
CAT2DOG = MANIFESTS / "pix2pix_zero" / "cat2dog.toml"
IMMERSION = MANIFESTS / "compositing" / "immersion.toml"
POSE = MANIFESTS / "interpolation" / "pose.toml"
FINETUNE = MANIFESTS / "diffusionclip" / "finetune.toml"
MULTI = MANIFESTS / "diffusionclip" / "multi_attribute.toml"
PHOTOS = ", ".join(skimage_photos())


def write(folder: Path, name: str, data: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def ok_with(text: str) -> str:
    """ok.toml with its photo section or stages changed."""
    return OK + text


def _pose_recipe(folder: Path, astronaut: str | None = None) -> Path:
    """The pose recipe copied into ``folder``, with another astronaut keypoint file."""
    for path in (MANIFESTS / "interpolation").glob("*"):
        if path.is_file():  # not the baselines beside the locks
            shutil.copy(path, folder)
    if astronaut is not None:
        write(folder, "astronaut_pose.json", astronaut)
    return folder / "pose.toml"


def _mismatched_controlnet(folder: Path) -> Path:
    """The pose recipe next to a ControlNet with half the tiny UNet's channels."""
    from diffusers import ControlNetModel

    ControlNetModel(
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        conditioning_embedding_out_channels=(16, 32, 32, 32),
    ).save_pretrained(folder / "cn")  # fmt: skip
    return _pose_recipe(folder)


OPENPOSE = '{"people": [{"pose_keypoints_2d": [%s]}]}'

# (id, how to make the recipe -> path, extra arguments, expected stderr ({f}: the recipe))
CASES = [
    ("latin-1 byte", lambda d: write(d, "r.toml", b"schema_version = 1\n# caf\xe9\n"), [],
     "{f}:2: not UTF-8 text (byte 0xe9 at offset 24) (save the recipe as UTF-8)"),
    ("utf-16", lambda d: write(d, "r.toml", "schema_version = 1\n".encode("utf-16")), [],
     "{f}:1: not UTF-8 text (byte 0xff at offset 0) (save the recipe as UTF-8)"),
    ("png as recipe", lambda d: shutil.copy(skimage_photos()["chelsea"], d / "r.toml"), [],
     "{f}:1: not UTF-8 text (byte 0x89 at offset 0) (save the recipe as UTF-8)"),
    ("deep toml", lambda d: write(d, "r.toml", "a = " + "[" * 3000 + "]" * 3000), [],
     "{f}: tables or arrays nested deeper than 32 levels"),
    ("deep json", lambda d: write(d, "r.json", '{"a": ' + "[" * 90000 + "]" * 90000 + "}"), [],
     "{f}: tables or arrays nested deeper than 32 levels"),
    ("seed too big", lambda d: write(d, "r.toml", OK.replace("1\n", "1\nseed = 9223372036854775808\n", 1)), [],
     "{f}:3: seed: must be <= 9223372036854775807, got 9223372036854775808"),
    ("huge size", lambda d: write(d, "r.toml", OK.replace("[64, 64]", "[100000, 100000]")), [],
     "{f}:4: inputs.photo: size must be at most 8192 px per side (diffusion models work at a "
     "few hundred), got [100000, 100000]"),
    ("thin size", lambda d: write(d, "r.toml", OK.replace("[64, 64]", "[8, 8000000]")), [],
     "{f}:4: inputs.photo: size must be at most 8192 px per side (diffusion models work at a "
     "few hundred), got [8, 8000000]"),
    ("1000 steps", lambda d: TEXT_EDIT, ["--set", "stages.invert.num_inference_steps=1000"],
     "--set stages.invert.num_inference_steps=1000: stages.invert.num_inference_steps: "
     "must be <= 999, got 1000"),
    ("long stage name", lambda d: write(d, "r.toml", OK.replace("[stages.decode]", "[stages." + "d" * 300 + "]")), [],
     "{f}:12: stages." + "d" * 300 + ": not a valid name: use letters, digits, '_' and '-', "
     "starting with a letter or '_', at most 64 characters"),
    ("1x1 image", lambda d: _tiny_image(d), [],
     "{f}:5: inputs.photo.image: dot.png is 1x1 px; images need at least 8 px per side (or set size)"),
    ("empty figure", lambda d: write(d, "r.toml", ok_with('[stages.figure]\nkind = "figure.grid"\nimages = []\n')), [],
     "{f}:17: stages.figure.images: must hold at least 1 item, got []"),
    ("skimage glob", lambda d: write(d, "r.toml", OK.replace("skimage:chelsea", "skimage:c*")), [],
     "{f}:5: inputs.photo.image: scikit-image has no photo 'skimage:c*' (it has: " + PHOTOS + ")"),
    ("skimage path", lambda d: write(d, "r.toml", OK.replace("skimage:chelsea", "skimage:../../../etc/ssl/openssl")), [],
     "{f}:5: inputs.photo.image: scikit-image has no photo 'skimage:../../../etc/ssl/openssl' "
     "(it has: " + PHOTOS + ")"),
    ("huge text", lambda d: _huge_text(d), [],
     "{f}:17: inputs.notes.text: notes.txt is larger than 16 MiB"),
    ("unknown target", lambda d: RECIPES / "ok.toml", ["--target", "zzz"],
     "--target: no stage named 'zzz' (stages: encode, decode)"),
    # Part 2: what the recipe fixes statically is checked while planning.
    ("eta differs", lambda d: TEXT_EDIT, ["--set", "stages.edit.eta=0.5"],
     "--set stages.edit.eta=0.5: stages.edit.eta: is 0.5 but noise_maps come from 'invert', "
     "which has 1.0 (leave it out to take the producer's)"),
    ("scheduler differs", lambda d: TEXT_EDIT, ["--set", 'stages.edit.scheduler="dpmsolver++"'],
     "--set stages.edit.scheduler=\"dpmsolver++\": stages.edit.scheduler: is 'dpmsolver++' but "
     "noise_maps come from 'invert', which has 'ddim' (leave it out to take the producer's)"),
    ("steps differ", lambda d: TEXT_EDIT, ["--set", "stages.edit.num_inference_steps=50"],
     "--set stages.edit.num_inference_steps=50: stages.edit.num_inference_steps: is 50 but "
     "noise_maps come from 'invert', which has 100 (leave it out to take the producer's)"),
    ("guided steps differ", lambda d: CAT2DOG, ["--set", "stages.guided.num_inference_steps=10"],
     "--set stages.guided.num_inference_steps=10: stages.guided.num_inference_steps: is 10 but "
     "attention_maps come from 'reference', which has 20 (leave it out to take the producer's)"),
    ("no target word", lambda d: CAT2DOG, ["--set", 'stages.direction.target_word=" "'],
     "--set stages.direction.target_word=\" \": stages.direction.target_word: no target "
     "sentences: set target_word or connect target_sentences"),
    ("caption prompt too long", lambda d: CAT2DOG, ["--set", 'stages.caption.prompt="' + "cat " * 70 + '"'],
     "--set stages.caption.prompt=\"" + "cat " * 70 + "\": stages.caption.prompt: the prompt "
     "takes all 71 of the captioner's text positions: shorten the prompt"),
    ("caption prompt too many tokens", lambda d: CAT2DOG, ["--set", 'stages.caption.prompt="' + "cat, " * 40 + '"'],
     "--set stages.caption.prompt=\"" + "cat, " * 40 + "\": stages.caption.prompt: the prompt "
     "takes all 81 of the captioner's text positions: shorten the prompt"),
    # Compositing: sizes and factors the plan knows.
    ("object outside", lambda d: IMMERSION, ["--set", "stages.paste.position=[40, 40]"],
     "--set stages.paste.position=[40, 40]: stages.paste.position: the object (32x32 after "
     "scale) at [40, 40] falls outside the background (64x64)"),
    ("object mask size", lambda d: IMMERSION, ["--set", "inputs.object.size=[16, 16]"],
     "{f}:28: stages.paste.object_mask: object_mask is 32x32 but object is 16x16"),
    ("ilvr mask size", lambda d: IMMERSION, ["--set", 'stages.immerse.mask="inputs.disc"'],
     "--set stages.immerse.mask=\"inputs.disc\": stages.immerse.mask: mask is 32x32 but the "
     "reference is 64x64"),
    ("n does not divide", lambda d: IMMERSION, ["--set", "stages.immerse.n_in=3"],
     "--set stages.immerse.n_in=3: stages.immerse.n_in: n_in = 3 does not divide the latent "
     "size 8x8"),
    ("t above 1", lambda d: IMMERSION, ["--set", "stages.immerse.t_in=1.5"],
     "--set stages.immerse.t_in=1.5: stages.immerse.t_in: must be <= 1.0, got 1.5"),
    # Part 3: recipe values keep their types.
    ("bool as string", lambda d: CAT2DOG, ["--set", 'stages.invert.regularize="yes"'],
     "--set stages.invert.regularize=\"yes\": stages.invert.regularize: must be true or false, "
     "got 'yes'"),
    ("seed as bool", lambda d: write(d, "r.toml", OK.replace("1\n", "1\nseed = true\n", 1)), [],
     "{f}:3: seed: must be an integer, got True"),
    ("seed as string", lambda d: write(d, "r.toml", OK.replace("1\n", '1\nseed = "0"\n', 1)), [],
     "{f}:3: seed: must be an integer, got '0'"),
    ("number as string", lambda d: TEXT_EDIT, ["--set", 'stages.edit.cfg_tar="3.5"'],
     "--set stages.edit.cfg_tar=\"3.5\": stages.edit.cfg_tar: must be a number, got '3.5'"),
    ("number as bool", lambda d: TEXT_EDIT, ["--set", "stages.edit.cfg_tar=true"],
     "--set stages.edit.cfg_tar=true: stages.edit.cfg_tar: must be a number, got True"),
    ("no levels", lambda d: POSE, ["--set", "stages.interpolate.levels=0"],
     "--set stages.interpolate.levels=0: stages.interpolate.levels: must be >= 1, got 0"),
    ("8 levels", lambda d: POSE, ["--set", "stages.interpolate.levels=8"],
     "--set stages.interpolate.levels=8: stages.interpolate.levels: must be <= 7, got 8"),
    ("keypoints not openpose", lambda d: _pose_recipe(d, astronaut='{"pose": [1, 2]}'), [],
     '{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: not OpenPose JSON: '
     'expected {{"people": [{{"pose_keypoints_2d": [...]}}]}}'),
    ("keypoints too few", lambda d: _pose_recipe(d, astronaut='{"people": [{"pose_keypoints_2d": [1, 2, 3]}]}'), [],
     "{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: people[0].pose_keypoints_2d "
     "has 3 numbers; OpenPose's body model has 18 points of (x, y, confidence), 54 numbers"),
    ("keypoints nan", lambda d: _pose_recipe(d, astronaut=OPENPOSE % ("NaN, " + "0.5, " * 52 + "1")), [],
     "{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: people[0].pose_keypoints_2d "
     "holds NaN or infinity"),
    ("keypoints negative confidence", lambda d: _pose_recipe(d, astronaut=OPENPOSE % ("0.5, 0.5, -1, " + "0.5, " * 50 + "1")), [],
     "{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: a confidence is negative: "
     "confidences are 0 (missing) to 1"),
    ("keypoints far away", lambda d: _pose_recipe(d, astronaut=OPENPOSE.replace("]}]}", "]}], \"canvas_width\": 512, \"canvas_height\": 512}") % ("1e9, 5, 1, " + "5, " * 50 + "1")), [],
     "{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: the point [1000000000.0, 5] "
     "lies outside the 512 x 512 canvas"),
    ("keypoints nested", lambda d: _pose_recipe(d, astronaut="[" * 100_000 + "]" * 100_000), [],
     "{f}:22: inputs.astronaut_pose.keypoints: astronaut_pose.json: not OpenPose JSON: nested too "
     "deeply"),
    ("text with size", lambda d: write(d, "r.toml", OK + '[inputs.words]\ntext = "w.txt"\nsize = [64, 64]\n'), [],
     "{f}:15: inputs.words: 'size' is for images, not for text"),
    ("json duplicate key", lambda d: write(d, "r.json", '{"schema_version": 1, "seed": 0, "seed": 1, "stages": {}}'), [],
     "{f}: invalid JSON: duplicate key 'seed'"),
    ("ratio without weights", lambda d: MANIFESTS / "quickstart.toml", ["--set", "stages.edit.ratio=0.5"],
     "--set stages.edit.ratio=0.5: stages.edit.ratio: mixes tuned weights with the original, but"
     " no weights are connected: connect weights or remove ratio"),
    ("ratio inf threshold", lambda d: MULTI, ["--set", "stages.edit.ratio={inf=[1,1],0=[1,1]}"],
     "--set stages.edit.ratio={{inf=[1,1],0=[1,1]}}: stages.edit.ratio: threshold 'inf' must be a"
     " timestep from 0 to 999"),
    ("table preset", lambda d: MANIFESTS / "compositing" / "immersion.toml", ["--set", "stages.immerse.preset={a=1}"],
     "--set stages.immerse.preset={{a=1}}: stages.immerse.preset: must be one of 'scribble',"
     " 'immersion' or 'background', got {{'a': 1}}"),
    ("unhashable preset", lambda d: MANIFESTS / "compositing" / "immersion.toml", ["--set", "stages.immerse.preset=['x']"],
     "--set stages.immerse.preset=['x']: stages.immerse.preset: must be one of 'scribble',"
     " 'immersion' or 'background', got ['x']"),
    ("identity loss", lambda d: FINETUNE, ["--set", "stages.finetune.w_id=0.5"],
     "--set stages.finetune.w_id=0.5: stages.finetune.w_id: needs a face-recognition model for "
     "the identity loss, which editflow does not have: set w_id = 0"),
    ("ratio table length", lambda d: MULTI, ["--set", "stages.edit.ratio={300=[0.4,0.6,0.1],0=[1,1]}"],
     "--set stages.edit.ratio={{300=[0.4,0.6,0.1],0=[1,1]}}: stages.edit.ratio: threshold 300 has 3 "
     "weights but weights has 2 references"),
    ("ratio table without 0", lambda d: MULTI, ["--set", "stages.edit.ratio={300=[0.4,0.6]}"],
     "--set stages.edit.ratio={{300=[0.4,0.6]}}: stages.edit.ratio: needs a threshold 0: the "
     "timesteps below 300 would have no weights"),
    ("ratio nan weight", lambda d: MULTI, ["--set", "stages.edit.ratio={0=[nan,1]}"],
     "--set stages.edit.ratio={{0=[nan,1]}}: stages.edit.ratio: threshold 0: weights must be finite"
     " numbers"),
    ("one ratio two models", lambda d: MULTI, ["--set", "stages.edit.ratio=0.5"],
     "--set stages.edit.ratio=0.5: stages.edit.ratio: a single ratio mixes one tuned model with "
     "the original, but weights has 2: give a table of weight vectors"),
    ("t0 above the steps", lambda d: FINETUNE, ["--set", "stages.invert.t0=1000"],
     "--set stages.invert.t0=1000: stages.invert.t0: must be <= 999, got 1000"),
    ("controlnet for another unet", _mismatched_controlnet, ['--set', 'model.controlnet="cn"'],
     "{f}:35: stages.interpolate: the ControlNet 'cn' does not match the model's UNet "
     "(block_out_channels differ): use a ControlNet trained for 'tiny'"),
]  # fmt: skip


def _tiny_image(folder: Path) -> Path:
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    return write(
        folder, "r.toml", OK.replace("skimage:chelsea", "dot.png").replace("size = [64, 64]\n", "")
    )


def _huge_text(folder: Path) -> Path:
    with open(folder / "notes.txt", "wb") as handle:
        handle.truncate((16 << 20) + 1)
    return write(folder, "r.toml", OK + '\n[inputs.notes]\ntext = "notes.txt"\n')


@pytest.mark.parametrize(
    ("make", "extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_is_one_located_line_exit_2_and_nothing_written(
    make, extra, expected, command, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "recipe"
    folder.mkdir()
    recipe = Path(make(folder))
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = [command, str(recipe), "--cache", str(cache), *extra]
    if command == "run":
        argv += ["--out", str(out)]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == expected.format(f=recipe)
    assert "Traceback" not in captured.err + captured.out
    assert not cache.exists() and not out.exists()


def test_out_naming_an_existing_file_is_refused_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    taken = write(tmp_path, "taken", "not a folder")
    code = main(
        ["run", str(RECIPES / "ok.toml"), "--cache", str(tmp_path / "c"), "--out", str(taken)]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == f"--out: {taken} is a file, not a folder"
    assert not (tmp_path / "c").exists()


def test_a_full_disk_is_one_line_and_the_cache_stays_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from editflow.cache import Cache, EntryWriter

    def full(self, name, value, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c"))

    monkeypatch.setattr(EntryWriter, "write", full)
    argv = [
        "run",
        str(RECIPES / "ok.toml"),
        "--cache",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"{tmp_path / 'c'}: No space left on device"
    )
    assert Cache(tmp_path / "c").ls() == [] and Cache(tmp_path / "c").verify() == []


def test_a_cache_marker_with_unexpected_json_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "c").mkdir()
    write(tmp_path / "c", "editflow-cache.json", "[1, 2]")
    code = main(["validate", str(RECIPES / "ok.toml"), "--cache", str(tmp_path / "c")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"cache at {tmp_path / 'c'} has layout format [1, 2], this editflow reads format 1 "
        "(use another cache location or a matching editflow version)"
    )


def test_validate_takes_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["validate", str(RECIPES / "ok.toml"), "--cache", str(tmp_path / "c"), "--target", "encode"]
    )
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("ok (2 stages, 1 inputs)")


def test_the_background_preset_on_a_4_channel_model_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = MANIFESTS / "compositing" / "background.toml"
    code = main(
        ["run", str(recipe), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
         "--set", 'model.id="tiny"', "--set", "stages.generate.num_inference_steps=2"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # Refused while planning, from the UNet's config: nothing ran.
    assert err.strip().splitlines()[-1] == (
        f"{recipe}:45: stages.generate.preset: preset 'background' needs an inpainting UNet (9 input "
        "channels); this model's UNet takes 4 (set model.id to an inpainting model such as "
        "'tiny-inpaint')"
    )
    assert not (tmp_path / "o").exists()


def test_vae_stages_on_a_pixel_model_and_pixel_stages_on_a_latent_model_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write(tmp_path, "r.toml", OK + '\n[model]\nid = "tiny-pixel"\n')
    code = main(["validate", str(recipe), "--cache", str(tmp_path / "c")])
    assert code == 2
    hint = "has no VAE: it denoises pixels, so images enter with encode.pixels and leave with decode.pixels"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{recipe}:8: stages.encode: model 'tiny-pixel' {hint}",
        f"{recipe}:12: stages.decode: model 'tiny-pixel' {hint}",
    ]
    code = main(["validate", str(FINETUNE), "--cache", str(tmp_path / "c"), "--set",
                 'model.id="tiny"'])  # fmt: skip
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    latent = (
        "model 'tiny' denoises VAE latents: images enter with encode.vae and leave with decode.vae"
    )
    assert lines[0] == f"{FINETUNE}:27: stages.encode_cat: {latent}"
    assert f"{FINETUNE}:82: stages.decode_edit: {latent}" in lines
    # The fine-tune itself takes a latent model too (it decodes x0 through the VAE).
    assert not any("stages.finetune:" in line for line in lines)
    assert not (tmp_path / "c").exists()


def test_validating_a_pose_recipe_imports_neither_torch_nor_scikit_image(tmp_path: Path) -> None:
    """Keypoint files are checked and scikit-image's photos found in plain Python."""
    from support import modules_imported_by

    argv = ["validate", str(_pose_recipe(tmp_path)), "--cache", str(tmp_path / "c")]
    assert modules_imported_by(argv, ("torch", "skimage")) == []
