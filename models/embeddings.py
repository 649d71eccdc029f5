"""Textual-inversion embeddings a recipe adds to its model's vocabulary (``[[model.embedding]]``).

Textual inversion (Gal et al. 2022) learns one input-embedding vector ``v*`` for a new token
``S*`` (or several: a multi-vector token ``<t>`` is added as ``<t> <t>_1 ... <t>_{n-1}``,
and prompt encoding rewrites ``<t>`` to all of them, as diffusers' pipelines do); prompts
that contain the token then condition on the learned concept. A file holds the
vector in one of the forms diffusers' ``load_textual_inversion`` takes: diffusers'
``{token: vector}`` (``learned_embeds.safetensors`` or ``.bin``), AUTOMATIC1111's ``.pt``/``.bin``
(``string_to_param``) or ``.safetensors`` (``emb_params``), or a bare tensor. ``.bin`` files are
read with ``torch.load(weights_only=True)``, which builds tensors and plain containers only.

An embedding is part of the model, not an input of one stage: it changes what every prompt
that names its token encodes to, in every stage that uses the text encoder, so its digest and
token join the model's fingerprint (as LoRA files do) and the text encoder and tokenizer are
loaded with it, together, by the registry.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from editflow.documents import Table
from editflow.errors import ModelUnavailableError, Problem

EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt")
MAX_EMBEDDING_BYTES = 16 << 20  # a vector or a few; anything bigger is the wrong file


class EmbeddingEntry(Table):
    """One textual-inversion embedding added to the model's vocabulary
    (``[[model.embedding]]``)."""

    path: str = Field(
        description="Embedding file (.safetensors, or .bin/.pt read with weights_only), "
        "relative to the recipe"
    )
    token: str | None = Field(
        None,
        min_length=1,
        pattern=r"^\S+$",
        description="The token prompts use, e.g. '<cat-toy>' (default: the name in the file)",
    )


@dataclass(frozen=True)
class EmbeddingFile:
    """An embedding entry checked and hashed at plan time.

    Attributes:
        key: Where the recipe names it (``model.embedding[0]``).
        path: The file.
        sha256: Its digest when planned; loading refuses a file that no longer has it.
        token: The token it adds.
        vectors: How many input-embedding rows (and tokens) it adds.
        parts: What it changes: the tokenizer gains the token, the text encoder its row.
    """

    key: str
    path: Path
    sha256: str
    token: str
    vectors: int = 1
    parts: ClassVar[tuple[str, ...]] = ("tokenizer", "text_encoder")

    def identity(self) -> dict[str, Any]:
        """What enters cache keys: the vector's file and the token that selects it."""
        return {"embedding": self.sha256, "token": self.token}


def resolve_embeddings(
    entries: Sequence[EmbeddingEntry], *, base_dir: Path, width: int | None
) -> tuple[list[EmbeddingFile], list[Problem]]:
    """Read, check and hash the recipe's embedding files (they are small).

    Args:
        entries: The recipe's ``[[model.embedding]]`` entries.
        base_dir: The recipe's folder.
        width: The text encoder's input-embedding width (``hidden_size``), or None when its
            config is not on disk yet (the width is then checked when it loads).

    Returns:
        The files, and a problem for each entry that cannot be used.
    """
    files: list[EmbeddingFile] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        key = f"model.embedding[{index}]"
        path = Path(base_dir) / Path(entry.path).expanduser()
        try:
            data = _read(path, entry.path)
            token, vectors = token_and_vectors(parse_embedding(data, entry.path), entry.token)
        except ValueError as error:
            problems.append(Problem(str(error), key=f"{key}.path"))
            continue
        if width is not None and vectors.shape[-1] != width:
            problems.append(Problem(
                f"{entry.path} holds a vector of {vectors.shape[-1]} numbers but the model's text"
                f" encoder embeds tokens in {width}", key=f"{key}.path",
                hint="use an embedding trained for this model",
            ))  # fmt: skip
            continue
        file = EmbeddingFile(key, path, hashlib.sha256(data).hexdigest(), token, len(vectors))
        taken = {name for other in files for name in added_tokens(other)}
        twice = [name for name in added_tokens(file) if name in taken]
        if twice:
            problems.append(Problem(f"token {twice[0]!r} is added twice", key=f"{key}.token"))
            continue
        files.append(file)
    return files, problems


def added_tokens(file: EmbeddingFile) -> list[str]:
    """The tokens a file adds to the vocabulary: ``<t>``, then ``<t>_1`` ... for each further
    vector (diffusers' names, which its prompt rewriting looks for)."""
    return [file.token] + [f"{file.token}_{index}" for index in range(1, file.vectors)]


def _read(path: Path, value: str) -> bytes:
    if not path.is_file():
        raise ValueError(f"file not found: {value} (relative paths start at the recipe's folder)")
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{value}: an embedding is a {', '.join(EMBEDDING_SUFFIXES)} file")
    with open(path, "rb") as handle:
        data = handle.read(MAX_EMBEDDING_BYTES + 1)
    if len(data) > MAX_EMBEDDING_BYTES:
        raise ValueError(f"{value} is larger than {MAX_EMBEDDING_BYTES >> 20} MiB")
    return data


def parse_embedding(data: bytes, value: str) -> Any:
    """A file's contents as ``load_textual_inversion`` takes them: a dict or a tensor.

    Raises:
        ValueError: It is neither safetensors nor a ``weights_only`` torch file.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    if value.endswith(".safetensors"):
        try:
            return load(data)
        except SafetensorError as error:
            raise ValueError(f"{value} is not a safetensors file: {error}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling raises many types; weights_only refuses code
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{value} cannot be read with torch.load(weights_only=True): {reason}"
        ) from None


def token_and_vectors(state: Any, token: str | None) -> tuple[str, Any]:
    """The token and its (N, D) vectors, read as diffusers' ``load_textual_inversion`` does.

    Raises:
        ValueError: Not an embedding, or no token named where the file has none.
    """
    import torch

    named = None
    if isinstance(state, dict) and "string_to_param" in state:  # AUTOMATIC1111's .pt
        named, vector = state.get("name"), (state["string_to_param"] or {}).get("*")
    elif isinstance(state, dict) and len(state) == 1:  # diffusers': {token: vector}
        named, vector = next(iter(state.items()))
    else:
        vector = state
    if not isinstance(vector, torch.Tensor) or vector.ndim not in (1, 2) or not vector.numel():
        raise ValueError(
            "not a textual-inversion embedding: expected {token: vector}, AUTOMATIC1111's"
            " string_to_param, or one tensor"
        )
    token = token or (named if isinstance(named, str) and named != "emb_params" else None)
    if token is None:
        raise ValueError("the file names no token: set token (for example '<my-concept>')")
    return token, vector.reshape(-1, vector.shape[-1])


def load_embeddings(tokenizer: Any, text_encoder: Any, files: Sequence[EmbeddingFile]) -> None:
    """Add each file's token to ``tokenizer`` and its vector to ``text_encoder``'s input
    embeddings, in place, with diffusers' ``load_textual_inversion``.

    Raises:
        ModelUnavailableError: A file changed since planning, its token is already in the
            vocabulary, or its vector does not fit the text encoder.
    """
    if not files:
        return
    states = []
    for file in files:
        data = file.path.read_bytes() if file.path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise ModelUnavailableError(
                f"{file.path.name} changed since the recipe was planned",
                key=f"{file.key}.path",
                hint="run again: the new file gets new cache keys",
            )
        states.append(parse_embedding(data, file.path.name))
    vectors = [
        token_and_vectors(state, file.token)[1] for state, file in zip(states, files, strict=True)
    ]
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    for file, vector in zip(files, vectors, strict=True):
        if vector.shape[-1] != width:
            raise ModelUnavailableError(
                f"{file.path.name} holds a vector of {vector.shape[-1]} numbers but the model's"
                f" text encoder embeds tokens in {width}",
                key=f"{file.key}.path",
                hint="use an embedding trained for this model",
            )
        vocabulary = tokenizer.get_vocab()
        for name in added_tokens(file):
            if name in vocabulary:
                raise ModelUnavailableError(
                    f"token {name!r} is already in the model's vocabulary",
                    key=f"{file.key}.token",
                    hint="choose another token",
                )
    _loader().load_textual_inversion(
        vectors,  # (N, D) each: N > 1 adds <t>_1 ... too
        token=[file.token for file in files],
        tokenizer=tokenizer,
        text_encoder=text_encoder,
    )


def expand_multi_vector_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Prompts with each multi-vector token ``<t>`` written as ``<t> <t>_1 ...``, with
    diffusers' own ``maybe_convert_prompt`` (what its pipelines do before they tokenize);
    prompts of a tokenizer without such tokens come back as they are."""
    if not any(name.endswith("_1") for name in tokenizer.added_tokens_encoder):
        return list(prompts)
    return list(_loader().maybe_convert_prompt(list(prompts), tokenizer))


def _loader() -> Any:
    """diffusers' textual-inversion loader, over the two parts it is given (no pipeline)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    class Parts(TextualInversionLoaderMixin):
        hf_device_map = None  # nothing here is offloaded by accelerate
        components: dict[str, Any] = {}

    return Parts()
