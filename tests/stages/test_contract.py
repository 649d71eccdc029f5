"""The stage contract: typed ``run`` per kind, declared components, one loop signature."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from editflow.models import PROVIDERS, RunModels, resolve_providers
from editflow.models.section import ModelSection
from editflow.stages import STAGE_KINDS, StageContext, StageKind
from editflow.stages.ddim_loops import ddim_invert, ddim_sample
from editflow.stages.diffusion import Callback, StepInfo
from editflow.stages.edit_friendly.inversion import edit_friendly_invert, edit_friendly_sample
from editflow.stages.pix2pix_zero.edit import guided_edit, reference_pass


@pytest.mark.parametrize("kind", STAGE_KINDS, ids=[kind.kind for kind in STAGE_KINDS])
def test_run_takes_its_params_model_and_one_keyword_per_input_port(
    kind: type[StageKind],
) -> None:
    signature = inspect.signature(kind.run)
    positional = [
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    keyword = {
        name: parameter
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert positional == ["self", "ctx", "params"]
    assert list(keyword) == [port.name for port in kind.inputs]
    hints = typing.get_type_hints(kind.run)
    assert hints["params"] is kind.params
    for port in kind.inputs:
        accepts_none = type(None) in typing.get_args(hints[port.name])
        assert accepts_none == port.optional or hints[port.name] is typing.Any, port.name


@pytest.mark.parametrize("kind", STAGE_KINDS, ids=[kind.kind for kind in STAGE_KINDS])
def test_every_component_spec_names_a_known_provider(kind: type[StageKind]) -> None:
    for spec in kind.components:
        assert spec.provider in PROVIDERS, f"{kind.kind}: {spec}"
    assert len({spec.name for spec in kind.components}) == len(kind.components)


def test_a_stage_gets_only_the_components_it_declared(models_dir) -> None:
    from editflow.stages.io.encode import EncodeVae

    resolved = resolve_providers(
        ModelSection(), ["model.id"], base_dir=models_dir, models_dir=models_dir
    )
    models = RunModels(resolved, device=torch.device("cpu"), dtype=torch.float32,
                       models_dir=models_dir)  # fmt: skip
    view = models.for_stage(EncodeVae.components)
    with pytest.raises(KeyError, match="component 'unet' was not declared by this stage"):
        view.get("unet")
    assert models.loads == []
    view.get("vae")
    assert models.loads == ["model.id:vae"]


def test_call_fills_unconnected_optional_inputs_and_refuses_unknown_ones() -> None:
    from editflow.stages.io.figure import FigureGrid, FigureParams

    ctx = StageContext("figure", 0, torch.device("cpu"), torch.float32)
    image = torch.rand(1, 3, 16, 16)
    out = FigureGrid().call(ctx, FigureParams(labels=["a"]), {"images": [image]})
    assert out["image"].shape[:2] == (1, 3)
    with pytest.raises(TypeError, match=r"figure.grid: unknown inputs \['pictures'\]"):
        FigureGrid().call(ctx, FigureParams(), {"pictures": [image]})


LOOPS = (ddim_sample, ddim_invert, edit_friendly_invert, edit_friendly_sample, guided_edit)


@pytest.mark.parametrize("loop", LOOPS, ids=[loop.__name__ for loop in LOOPS])
def test_every_loop_has_one_signature_with_keyword_only_knobs(loop) -> None:
    parameters = list(inspect.signature(loop).parameters.values())
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional[0] == "predict" and positional[2] == "scheduler"
    assert positional[3:] == ["cond", "uncond"]
    knobs = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert "callback" in {p.name for p in knobs}
    assert typing.get_type_hints(loop)["callback"] == (Callback | None)


def test_reference_pass_follows_the_loop_signature_without_a_negative_prompt() -> None:
    parameters = inspect.signature(reference_pass).parameters
    assert list(parameters)[:4] == ["predict_maps", "x_T", "scheduler", "cond"]
    assert parameters["record"].kind is inspect.Parameter.KEYWORD_ONLY


def test_loops_report_x_and_denoised_every_step() -> None:
    from diffusers import DDIMInverseScheduler, DDIMScheduler
    from support import SD_CONFIG

    def predict(x, t, embeds):
        return 0.1 * x

    x0, cond = torch.randn(1, 4, 8, 8), torch.zeros(1, 2, 4)
    scheduler = DDIMScheduler.from_config(SD_CONFIG)
    scheduler.set_timesteps(4)
    inverse = DDIMInverseScheduler.from_config(SD_CONFIG)
    inverse.set_timesteps(4)
    infos: list[StepInfo] = []
    x_T, _ = ddim_invert(predict, x0, inverse, cond, callback=infos.append)
    ddim_sample(predict, x_T, scheduler, cond, callback=infos.append)
    assert [info["i"] for info in infos] == [0, 1, 2, 3, 0, 1, 2, 3]
    for info in infos:
        assert set(info) >= {"i", "t", "x", "denoised"}
        assert info["denoised"].shape == x0.shape
