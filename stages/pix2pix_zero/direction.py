"""Stage ``direction.pix2pix_zero``: text-embedding edit directions without a language model.

pix2pix-zero (Parmar et al., SIGGRAPH 2023) edits along
``Delta c_edit = mean(E(target sentences)) - mean(E(source sentences))``, E the model's text
encoder with its full 77-token output. The released code asks GPT-3 for about 1000
sentences per word; editflow ships template banks instead (every template combined with
every context, a few hundred sentences per word) and accepts a user file of sentences, one
per line, for either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from pydantic import Field, model_validator

from editflow.errors import EditflowError, Problem
from editflow.lazy import lazy, no_grad
from editflow.models import specs
from editflow.stages.base import ArtifactType, CheckView, Params, Port, StageContext, StageKind
from editflow.stages.diffusion import encode_prompts

torch = lazy("torch")

# "{}" receives the word with its indefinite article ("a cat", "an owl").
TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a close-up photo of {}",
    "a blurry photo of {}",
    "a bright photo of {}",
    "a dark photo of {}",
    "a black and white photo of {}",
    "a cropped photo of {}",
    "a good photo of {}",
    "a low resolution photo of {}",
    "a high resolution photo of {}",
    "a vintage photo of {}",
    "a professional photograph of {}",
    "a snapshot of {}",
    "a picture of {}",
    "an image of {}",
    "a painting of {}",
    "an oil painting of {}",
    "a watercolor painting of {}",
    "a drawing of {}",
    "a pencil sketch of {}",
    "a cartoon of {}",
    "a 3d render of {}",
    "a digital illustration of {}",
    "a portrait of {}",
)

CONTEXTS: tuple[str, ...] = (
    "",
    " in a field",
    " on the street",
    " in a room",
    " at the beach",
    " in the snow",
    " in a forest",
    " at night",
    " in the city",
    " in a garden",
)

_ARTICLES = ("a ", "an ", "the ")


def _with_article(word: str) -> str:
    if word.lower().startswith(_ARTICLES):
        return word
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def sentences_for(word: str) -> list[str]:
    """The built-in sentence bank about ``word``: every template with every context.

    Args:
        word: A noun or short noun phrase (``cat``, ``horse``, ``the sea``).

    Returns:
        ``len(TEMPLATES) * len(CONTEXTS)`` (240) distinct sentences, in a fixed order.
    """
    word = " ".join(word.split())
    if not word:
        raise ValueError("the word for a sentence bank is empty")
    phrase = _with_article(word)
    sentences = [
        template.format(phrase) + context for template in TEMPLATES for context in CONTEXTS
    ]
    return list(dict.fromkeys(sentences))


def read_sentence_file(text: str) -> list[str]:
    """Parse a user sentence file: one sentence per line, surrounding blanks stripped.

    Args:
        text: The file's contents.

    Returns:
        The non-blank lines, in file order (duplicates kept: they weigh the mean).

    Raises:
        ValueError: When no line holds a sentence.
    """
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError("the sentence file has no sentences: write one sentence per line")
    return sentences


@no_grad
def bank_mean(
    tokenizer: Any, text_encoder: Any, sentences: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Mean text-encoder output of a sentence bank (Parmar et al. 2023).

    Encodes in batches (full padded 77-token output, as Stable Diffusion conditions on it) and
    averages with a float64 running sum, so memory does not grow with the bank.

    Args:
        tokenizer: The model's tokenizer.
        text_encoder: The model's text encoder.
        sentences: The bank, at least one sentence.
        batch_size: Sentences per text-encoder call.

    Returns:
        (1, tokens, D) mean embedding, in the text encoder's dtype.
    """
    if not sentences:
        raise ValueError("cannot average an empty sentence bank")
    total = None
    for start in range(0, len(sentences), batch_size):
        embeds = encode_prompts(tokenizer, text_encoder, sentences[start : start + batch_size])
        batch_sum = embeds.double().sum(dim=0, keepdim=True)
        total = batch_sum if total is None else total + batch_sum
        dtype = embeds.dtype
    return (total / len(sentences)).to(dtype)


def edit_direction(
    source_mean: torch.Tensor, target_mean: torch.Tensor, multiplier: float = 1.0
) -> torch.Tensor:
    """pix2pix-zero edit direction ``mean_target - mean_source`` (Parmar et al. 2023).

    Args:
        source_mean: (1, tokens, D) mean embedding of the source bank.
        target_mean: (1, tokens, D) mean embedding of the target bank.
        multiplier: Scales the direction (negative reverses the edit).

    Returns:
        (1, tokens, D) direction.
    """
    return multiplier * (target_mean - source_mean)


class DeriveDirectionParams(Params):
    source_word: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Word whose built-in sentence bank is the source (e.g. cat)",
    )
    target_word: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Word whose built-in sentence bank is the target (e.g. dog)",
    )
    multiplier: float = Field(
        1.0, ge=-10.0, le=10.0, description="Scale of the direction (negative reverses it)"
    )

    @model_validator(mode="after")
    def _distinct_words(self) -> Self:
        if (
            self.source_word is not None
            and self.target_word is not None
            and " ".join(self.source_word.split()).lower()
            == " ".join(self.target_word.split()).lower()
        ):
            raise ValueError(
                f"source_word and target_word are both {self.source_word!r}: the direction"
                " would be zero"
            )
        return self


class DeriveDirection(StageKind):
    """pix2pix-zero edit direction from two sentence banks (built-in templates or files)."""

    kind = "direction.pix2pix_zero"
    needs_text = True
    version = "1"
    description = "Edit direction mean(E(target sentences)) - mean(E(source sentences))"
    params = DeriveDirectionParams
    inputs = (
        Port(
            "source_sentences",
            ArtifactType.TEXT,
            "Source sentences, one per line (replaces source_word's built-in bank)",
            optional=True,
        ),
        Port(
            "target_sentences",
            ArtifactType.TEXT,
            "Target sentences, one per line (replaces target_word's built-in bank)",
            optional=True,
        ),
        Port(
            "source_bank",
            ArtifactType.EMBEDDING,
            "A direction.bank_mean output to use as the source mean (cached per bank)",
            optional=True,
        ),
        Port(
            "target_bank",
            ArtifactType.EMBEDDING,
            "A direction.bank_mean output to use as the target mean (cached per bank)",
            optional=True,
        ),
    )
    outputs = (
        Port("direction", ArtifactType.DIRECTION, "Edit direction (1, 77, D)"),
        Port("source_mean", ArtifactType.EMBEDDING, "Mean embedding of the source bank"),
        Port("target_mean", ArtifactType.EMBEDDING, "Mean embedding of the target bank"),
    )
    components = (specs.TEXT_ENCODER, specs.TOKENIZER)

    @classmethod
    def check(cls, params: DeriveDirectionParams, view: CheckView) -> list[Problem]:
        problems: list[Problem] = []
        for side in ("source", "target"):
            word = getattr(params, f"{side}_word")
            given = {f"{side}_sentences", f"{side}_bank"} & set(view.references)
            if not given and (word is None or not word.strip()):
                message = f"no {side} sentences: set {side}_word or connect {side}_sentences"
                problems.append(Problem(message, key=f"{side}_word" if word is not None else None))
        return problems

    def run(
        self,
        ctx: StageContext,
        params: DeriveDirectionParams,
        *,
        source_sentences: str | None,
        target_sentences: str | None,
        source_bank: torch.Tensor | None,
        target_bank: torch.Tensor | None,
    ) -> dict[str, Any]:
        tokenizer = ctx.models.get("tokenizer")
        text_encoder = ctx.models.get("text_encoder")
        given = {"source": source_bank, "target": target_bank}
        texts = {"source": source_sentences, "target": target_sentences}
        # Both banks are checked before the (slow) encoding, so every problem shows at once.
        banks = {
            side: self._sentences(ctx, params, texts[side], side)
            for side in ("source", "target")
            if given[side] is None
        }
        means = {side: bank_mean(tokenizer, text_encoder, bank) for side, bank in banks.items()}
        means.update({side: mean for side, mean in given.items() if mean is not None})
        direction = edit_direction(means["source"], means["target"], params.multiplier)
        return {
            "direction": direction,
            "source_mean": means["source"],
            "target_mean": means["target"],
        }

    @staticmethod
    def _sentences(
        ctx: StageContext, params: DeriveDirectionParams, text: str | None, side: str
    ) -> list[str]:
        if text is not None:
            try:
                return read_sentence_file(text)
            except ValueError as error:
                raise EditflowError(
                    str(error),
                    key=f"stages.{ctx.name}.{side}_sentences",
                    hint=f"or leave it out to use {side}_word's built-in bank",
                ) from None
        word = getattr(params, f"{side}_word")
        if word is None or not word.strip():
            raise EditflowError(
                f"no {side} sentences",
                key=f"stages.{ctx.name}",
                hint=f"set {side}_word or connect {side}_sentences to a text file",
            )
        return sentences_for(word)


class BankMeanParams(Params):
    word: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Word whose built-in sentence bank to encode (when no sentences are given)",
    )


class BankMean(StageKind):
    """The mean text embedding of one sentence bank, cached on its own.

    Its key holds the sentence file's digest (or the word) and the model, so recipes and
    directions that share a bank (cat -> dog and cat -> horse) encode it once.
    """

    kind = "direction.bank_mean"
    needs_text = True
    version = "1"
    description = "Mean full text-encoder output over a sentence bank (file or built-in word)"
    params = BankMeanParams
    inputs = (Port("sentences", ArtifactType.TEXT, "Sentences, one per line", optional=True),)
    outputs = (Port("mean", ArtifactType.EMBEDDING, "Mean embedding (1, 77, D)"),)
    components = (specs.TEXT_ENCODER, specs.TOKENIZER)

    @classmethod
    def check(cls, params: BankMeanParams, view: CheckView) -> list[Problem]:
        if "sentences" not in view.references and (params.word is None or not params.word.strip()):
            return [Problem("no sentences: set word or connect sentences")]
        return []

    def run(
        self, ctx: StageContext, params: BankMeanParams, *, sentences: str | None
    ) -> dict[str, Any]:
        text = sentences
        if text is not None:
            try:
                sentences = read_sentence_file(text)
            except ValueError as error:
                raise EditflowError(str(error), key=f"stages.{ctx.name}.sentences") from None
        elif params.word is not None and params.word.strip():
            sentences = sentences_for(params.word)
        else:
            raise EditflowError(
                "no sentences", key=f"stages.{ctx.name}", hint="set word or connect sentences"
            )
        tokenizer, text_encoder = ctx.models.get("tokenizer"), ctx.models.get("text_encoder")
        return {"mean": bank_mean(tokenizer, text_encoder, sentences)}
