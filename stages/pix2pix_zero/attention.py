"""Cross-attention capture for pix2pix-zero (Parmar et al., SIGGRAPH 2023).

:func:`install_attention_recorder` wraps every cross-attention layer of a diffusers
``UNet2DConditionModel`` in a recording processor that keeps the layer's own (fused SDPA)
computation for its output, and puts the original processors back on exit::

    with install_attention_recorder(unet) as recorder:
        predict_maps = recorder.predictor(unet_noise_predictor(unet))
        eps, maps = predict_maps(x_t, t, embeds)  # maps: {layer name: (N * heads, q, k)}

Only calls made through ``recorder.predictor`` (or inside ``recorder.capturing()``) record
anything, so a plain noise prediction on the same UNet stores no maps. The recorded
probabilities keep their autograd graph, which is what cross-attention guidance
differentiates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from editflow.lazy import lazy
from editflow.stages.diffusion import NoisePredictor

torch = lazy("torch")

# Attention maps of one UNet call: {layer module name: (N * heads, queries, keys)}.
AttentionMaps = dict[str, "torch.Tensor"]

# (x_t, t, embeds) -> (eps_hat, maps of that call).
MapsPredictor = Callable[..., tuple["torch.Tensor", AttentionMaps]]


class RecordingCrossAttnProcessor:
    """A diffusers attention processor that hands its attention probabilities to a recorder.

    The layer's output always comes from the processor it had before (PyTorch's fused SDPA
    in current diffusers), so a recorded call and a plain one compute the same numbers.
    While the recorder captures, the probabilities ``softmax(Q K^T / sqrt(d))`` are also
    computed explicitly from the same projections (with their autograd graph, which
    cross-attention guidance differentiates) and stored; outside capture nothing extra runs.
    """

    def __init__(self, recorder: AttentionRecorder, name: str, fallback: Any) -> None:
        self.recorder = recorder
        self.name = name
        self.fallback = fallback

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.recorder.capturing_now and encoder_hidden_states is not None:
            self.recorder.store(
                self.name,
                _probabilities(attn, hidden_states, encoder_hidden_states, attention_mask, temb),
            )
        return self.fallback(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
        )


def _probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> torch.Tensor:
    """(N * heads, q, k) attention probabilities of a cross-attention layer, computed as
    diffusers' ``AttnProcessor`` does before it multiplies them with the values."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    batch, length, _ = encoder_hidden_states.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
    return attn.get_attention_scores(query, key, attention_mask)


class AttentionRecorder:
    """Holds the cross-attention probabilities of the latest recorded UNet call.

    Attributes:
        layers: Names of the cross-attention modules recorded, in ``named_modules`` order
            (``down_blocks.0.attentions.0.transformer_blocks.0.attn2`` ...).
        maps: ``{layer name: (N * heads, q, k)}`` of the latest call made while capturing.
            With ``cfg_batch`` only the conditional half (the second half of the batch, the
            order diffusers' pipelines use: ``[uncond, cond]``) is kept.
    """

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers
        self.maps: AttentionMaps = {}
        self._capturing = False
        self._cfg_batch = False

    @property
    def capturing_now(self) -> bool:
        """Whether the UNet call under way is being recorded."""
        return self._capturing

    def store(self, name: str, probs: torch.Tensor) -> None:
        """Called by the processors; keeps ``probs`` only while capturing."""
        if not self._capturing:
            return
        if self._cfg_batch:
            # head_to_batch_dim lays the batch out sample-major: [sample 0 heads, sample 1 ...]
            probs = probs[probs.shape[0] // 2 :]
        self.maps[name] = probs

    @contextmanager
    def capturing(self, cfg_batch: bool = False) -> Iterator[AttentionMaps]:
        """Record the UNet calls made inside; yields the dict the maps land in.

        Args:
            cfg_batch: The calls batch ``[uncond, cond]``; keep the conditional half only.
        """
        self.maps = {}
        self._capturing, self._cfg_batch = True, cfg_batch
        try:
            yield self.maps
        finally:
            self._capturing, self._cfg_batch = False, False

    def predictor(self, predict: NoisePredictor) -> MapsPredictor:
        """Wrap a noise predictor on the same UNet to also return the call's maps."""

        def predict_maps(
            x_t: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor
        ) -> tuple[torch.Tensor, AttentionMaps]:
            with self.capturing() as maps:
                eps = predict(x_t, t, embeds)
            self.maps = {}
            return eps, maps

        return predict_maps


@contextmanager
def install_attention_recorder(unet: Any) -> Iterator[AttentionRecorder]:
    """Install a recording processor on every cross-attention layer of ``unet``.

    A layer counts as cross-attention when its ``Attention`` module was built with a
    ``cross_attention_dim`` (``is_cross_attention``; ``attn2`` in SD's UNets). On exit the
    original processors (whatever they were, fused or not) are restored.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (anything with ``attn_processors`` and
            ``set_attn_processor``).

    Yields:
        The :class:`AttentionRecorder`; its maps are keyed by the layer's module name.
    """
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: its module's names
    original = dict(unet.attn_processors)
    layers = [
        name
        for name, module in unet.named_modules()
        if f"{name}.processor" in original and getattr(module, "is_cross_attention", False)
    ]
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layer to record")
    recorder = AttentionRecorder(layers)
    processors = dict(original)
    for name in layers:
        fallback = original[f"{name}.processor"]
        processors[f"{name}.processor"] = RecordingCrossAttnProcessor(recorder, name, fallback)
    unet.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(original)


def attention_loss(current: AttentionMaps, reference: AttentionMaps) -> torch.Tensor:
    """pix2pix-zero cross-attention guidance loss (Parmar et al. 2023, ||M_edit - M_ref||^2).

    Per layer: the squared difference summed over the query and key positions of each map
    and averaged over the maps (N * heads), then summed over layers. This is the released
    code's normalisation (``((curr - ref) ** 2).sum((1, 2)).mean(0)``), the one its default
    step size ``xa_guidance = 0.1`` was tuned for; a plain element-wise mean would shrink the
    gradient by q * k (about 3e5 for SD's 64x64 layers) and make that default a no-op.
    The reference is cast to the current maps' device and dtype (it is cached in fp16).

    Args:
        current: ``{layer: (N * heads, q, k)}`` maps of the edit pass (with autograd graph).
        reference: ``{layer: (N * heads, q, k)}`` maps of the reference pass, same layers.

    Returns:
        Scalar loss.
    """
    if current.keys() != reference.keys():
        missing = sorted(set(current) ^ set(reference))
        raise ValueError(f"attention maps cover different layers: {missing}")
    loss = None
    for name, maps in current.items():
        target = reference[name].to(device=maps.device, dtype=maps.dtype)
        layer_loss = ((maps - target) ** 2).sum(dim=(1, 2)).mean(dim=0)
        loss = layer_loss if loss is None else loss + layer_loss
    if loss is None:
        raise ValueError("no attention maps to compare")
    return loss
