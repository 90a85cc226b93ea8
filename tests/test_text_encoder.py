"""The text encoder's architecture must match its checkpoint, or save + reload gives another model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from copa.config import TextConfig
from copa.model.text import TextEncoder

MINILM = TextConfig(pretrained="minilm", layers=2, width=384, heads=12, intermediate=1536)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"heads": 6}, "num_attention_heads"),
        ({"intermediate": 1024}, "intermediate_size"),
        ({"layers": 7}, "num_hidden_layers"),
        ({"width": 256}, "hidden_size"),
    ],
)
def test_mismatched_text_config_raises(change, field):
    # heads=6 used to load MiniLM's 12 heads live and rebuild 6 after save/load (outputs off by 0.86)
    with pytest.raises(ValueError, match=field):
        TextEncoder(dataclasses.replace(MINILM, **change))


def test_matching_text_config_reloads_the_same_encoder():
    live = TextEncoder(MINILM).eval()
    reloaded = TextEncoder(MINILM, load_weights=False).eval()  # what from_pretrained builds
    reloaded.load_state_dict(live.state_dict())
    ids = torch.tensor([[101, 1037, 2417, 4418, 2006, 1996, 2187, 102]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(live(ids, mask), reloaded(ids, mask), atol=1e-5)
