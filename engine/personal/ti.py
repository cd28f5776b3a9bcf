"""Textual Inversion embedding files: their layout, writing one, and adding its word to a pipeline.

A file holds a word's learned rows (float32, ``[vectors, width]``), keyed the way diffusers'
``load_textual_inversion`` and the common tools read them:

- SD1.5: ``{token: [vectors, 768]}``, diffusers' own single-file format (the key is the token).
- SDXL: ``{"clip_l": [vectors, 768], "clip_g": [vectors, 1280]}`` (``SDXL_KEYS``), one
  ``load_textual_inversion`` call per text encoder.

Drawing with a trained word: ``loaded_ti`` (or ``load_ti`` / ``unload_ti``) adds the word to the resident
pipeline for one draw and removes it afterwards, under the same lock as the draw.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import EngineError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SDXL_KEYS = ("clip_l", "clip_g")
"""Keys of an SDXL embedding file (the common format: diffusers' advanced SDXL script, A1111, ComfyUI),
in the order of the pipeline's (tokenizer, text_encoder), (tokenizer_2, text_encoder_2)."""


class TextualInversionFileError(EngineError):
    """An embedding file that cannot be added to the pipeline (wrong format, wrong width, token taken)."""


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe`` has SDXL's second text encoder (and so takes two embeddings per token)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def encoder_attrs(pipe: DiffusionPipeline) -> list[tuple[str, str]]:
    """``pipe``'s (tokenizer, text encoder) attribute names, in the order of an embedding file's keys."""
    pairs = [("tokenizer", "text_encoder")]
    return pairs + [("tokenizer_2", "text_encoder_2")] if is_sdxl(pipe) else pairs


def write_embeddings(vectors: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes of a safetensors embedding file that ``load_textual_inversion`` reads.

    ``vectors`` maps each key (the token for SD1.5, ``SDXL_KEYS`` for SDXL) to its rows; they are
    stored as float32 on the CPU.
    """
    from safetensors.torch import save

    tensors = {key: rows.detach().to("cpu", torch.float32).contiguous() for key, rows in vectors.items()}
    return save(tensors, metadata={"format": "pt"})


# --- drawing with a learned word ---------------------------------------------------------------------------


def load_ti(pipe: DiffusionPipeline, weights: bytes | str | Path, token: str) -> None:
    """Add the word ``token`` from an embedding file (bytes or path) to ``pipe``'s tokenizers and encoders.

    Uses diffusers' ``load_textual_inversion``, once per text encoder for SDXL. The caller holds the lock
    that guards the pipeline and calls ``unload_ti`` before releasing it (or uses ``loaded_ti``). On
    failure (``TextualInversionFileError``) nothing of the word stays, not even a copy left over from an
    earlier draw that made loading fail.
    """
    tensors = _read_embedding_file(weights)
    try:
        for (tokenizer_attr, encoder_attr), tensor in zip(encoder_attrs(pipe), _per_encoder(pipe, tensors)):
            pipe.load_textual_inversion(
                tensor,
                token=token,
                tokenizer=getattr(pipe, tokenizer_attr),
                text_encoder=getattr(pipe, encoder_attr),
            )
    except ValueError as error:
        unload_ti(pipe, token)
        raise TextualInversionFileError(f"cannot add the word {token!r}: {error}") from error
    except BaseException:
        unload_ti(pipe, token)
        raise


def unload_ti(pipe: DiffusionPipeline, token: str) -> None:
    """Remove ``token`` and its extra vectors (``token_1``, ...) from every tokenizer and text encoder.

    A no-op where the word is not loaded; the embedding tables go back to their size before ``load_ti``.
    """
    for tokenizer_attr, encoder_attr in encoder_attrs(pipe):
        tokenizer, text_encoder = getattr(pipe, tokenizer_attr), getattr(pipe, encoder_attr)
        loaded = _loaded_tokens(tokenizer, token)
        if not loaded:
            continue
        pipe.unload_textual_inversion(tokens=loaded, tokenizer=tokenizer, text_encoder=text_encoder)
        # load_textual_inversion's resize wrote the grown size into the config; put the real one back.
        text_encoder.config.vocab_size = text_encoder.get_input_embeddings().num_embeddings


@contextmanager
def loaded_ti(pipe: DiffusionPipeline, weights: bytes | str | Path, token: str) -> Iterator[None]:
    """``load_ti`` for the duration of a ``with`` block, then ``unload_ti`` whatever happens.

    Hold the pipeline's lock around the whole block: no other user's draw may see the word.
    """
    load_ti(pipe, weights, token)
    try:
        yield
    finally:
        unload_ti(pipe, token)


def _loaded_tokens(tokenizer: Any, token: str) -> list[str]:
    """The tokens of the word ``token`` that ``tokenizer`` holds: ``token`` and ``token_1``, ``token_2``, ..."""
    extra = re.compile(re.escape(token) + r"_[0-9]+")
    return [t for t in tokenizer.added_tokens_encoder if t == token or extra.fullmatch(t)]


def _read_embedding_file(weights: bytes | str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        return load(weights) if isinstance(weights, bytes) else load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise TextualInversionFileError(f"not a safetensors embedding file: {error}") from error


def _per_encoder(pipe: DiffusionPipeline, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensor for each of ``pipe``'s text encoders, in ``encoder_attrs`` order."""
    if is_sdxl(pipe):
        if set(tensors) != set(SDXL_KEYS):
            raise TextualInversionFileError(f"an SDXL embedding file holds {SDXL_KEYS}, this one {sorted(tensors)}")
        return [tensors[key] for key in SDXL_KEYS]
    if len(tensors) != 1:
        raise TextualInversionFileError(f"an SD1.5 embedding file holds one tensor, this one {sorted(tensors)}")
    return list(tensors.values())
