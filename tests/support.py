"""Paths shared by the tests (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
MANIFESTS = ROOT / "manifests"

# Stable Diffusion 1.x's scheduler numbers, for tests that build schedulers without a model.
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def modules_imported_by(argv: list[str], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` an ``editflow`` command imports, run in a fresh interpreter (it
    must succeed)."""
    import ast
    import subprocess
    import sys

    script = (
        "import sys\nfrom editflow.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        f"print(sorted(m for m in {modules!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def invert_recipe(
    folder: Path,
    *,
    model_lines: str = "",
    prompt: str = "a photo of a cat",
    name: str = "r.toml",
    size: int = 32,
    invert_lines: str = "",
) -> Path:
    """A recipe that encodes a ``size`` px photo and DDIM-inverts it in 2 steps on ``tiny``,
    with extra ``[model]`` lines (LoRA or embedding entries) and ``[stages.invert]`` lines:
    the smallest run there is."""
    path = folder / name
    path.write_text(
        f"""schema_version = 1
[model]
id = "tiny"
{model_lines}
[inputs.photo]
image = "skimage:chelsea"
size = [{size}, {size}]

[stages.encode]
kind = "encode.vae"
images = "inputs.photo"

[stages.invert]
kind = "invert.ddim"
latents = "encode.latents"
prompt = "{prompt}"
num_inference_steps = 2
{invert_lines}
"""
    )
    return path
