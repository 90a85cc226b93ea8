"""Files shipped with COPA. ``STEM_TINY``: the image stem's warm start for the tiny preset (conv stem,
16-px patches, width 256), written by ``make stem-asset`` (``copa stem-stage``: 2,000 steps naming the
labelled objects of 10,000 synthetic images made with seed 1000, none of them a demo image); the
demo's trunk starts from it, as the paper's starts from a pretrained image encoder."""

from pathlib import Path

STEM_TINY = Path(__file__).resolve().with_name("stem_tiny.safetensors")
