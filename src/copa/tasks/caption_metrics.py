"""Captioning metrics through ``pycocoevalcap``: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D).

Inputs are COCO-style dicts ``{image_id: [caption, ...]}`` (references) and ``{image_id: caption}``
(one generated caption per image, as in a COCO result file ``[{"image_id", "caption"}]``).

Tokenisation: the Stanford PTB tokenizer shipped with pycocoevalcap (needs ``java``), as the COCO
caption server does; when it cannot run, a simple lowercase / punctuation-stripping tokenizer
takes its place (logged). METEOR also needs ``java``: when it fails, the other metrics are still
returned, with a logged warning. SPICE is not computed (it needs a model download).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Refs = Mapping[Any, Sequence[str]]
_PUNCT = re.compile(r"[^\w\s]")


def simple_tokenize(text: str) -> str:
    """Lowercase, punctuation -> space, squeeze whitespace (the fallback for the PTB tokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def tokenize(captions: Refs) -> dict[Any, list[str]]:
    """``{id: [caption, ...]}`` -> the same with tokenized captions (PTB when java works).

    Empty captions stay empty without going through PTB (it would drop their lines).
    """
    flat = [(k, j, c) for k in captions for j, c in enumerate(captions[k]) if c.strip()]
    out = {k: ["" for _ in captions[k]] for k in captions}
    tokens = _ptb([c for _, _, c in flat]) if flat else []
    if tokens is None:
        tokens = [simple_tokenize(c) for _, _, c in flat]
    for (k, j, _), t in zip(flat, tokens, strict=True):
        out[k][j] = t
    return out


def _ptb(texts: list[str]) -> list[str] | None:
    """PTB-tokenize ``texts`` in one java call; None (logged) when that is not possible."""
    if not shutil.which("java"):
        log.warning("java not found: captions are tokenized by the simple tokenizer, not PTB")
        return None
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        res = PTBTokenizer().tokenize({n: [{"caption": t}] for n, t in enumerate(texts)})
        if all(len(res.get(n, [])) == 1 for n in range(len(texts))):
            return [res[n][0] for n in range(len(texts))]
        log.warning("PTB tokenizer returned a wrong number of lines: using the simple tokenizer")
    except Exception as e:  # noqa: BLE001 - any failure of the java subprocess
        log.warning("PTB tokenizer failed (%s): using the simple tokenizer", e)
    return None


def _meteor(gts: dict[Any, list[str]], res_sets: dict[str, dict[Any, list[str]]]) -> dict[str, float]:
    """METEOR for each result set, one java process for all; {} when it cannot run."""
    if not shutil.which("java"):
        log.warning("java not found: METEOR skipped (other caption metrics unaffected)")
        return {}
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            return {name: float(scorer.compute_score(gts, res)[0]) for name, res in res_sets.items()}
        finally:
            scorer.meteor_p.kill()  # __del__ would also do it, but not reliably at interpreter exit
    except Exception as e:  # noqa: BLE001 - java crashes, out of memory, broken pipes
        log.warning("METEOR failed (%s): skipped, other caption metrics unaffected", e)
        return {}


def caption_scores(
    references: Refs,
    results: Mapping[str, Mapping[Any, str]],
    meteor: bool = True,
    cider_per_image: dict[str, dict[Any, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Score several result sets (e.g. the model and a baseline) against the same references.

    references: {image_id: [ref, ...]}; results: {set name: {image_id: caption}} covering the same
    ids. Returns {set name: {"bleu1".."bleu4", "meteor", "rouge_l", "cider"}} (pycocoevalcap scale:
    fractions, CIDEr in 0..10). ``cider_per_image``, if given, receives {set name: {image_id: CIDEr}}
    (the corpus CIDEr is their mean).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(references)
    for name, res in results.items():
        if set(res) != set(ids):
            raise ValueError(f"result set {name!r} does not cover the reference ids")
    # one tokenizer call for all texts: the java start-up is the expensive part
    merged: dict[Any, list[str]] = {("ref", i): list(references[i]) for i in ids}
    merged.update({(name, i): [res[i]] for name, res in results.items() for i in ids})
    tok = tokenize(merged)
    gts = {i: tok[("ref", i)] for i in ids}
    res_sets = {name: {i: tok[(name, i)] for i in ids} for name in results}
    out: dict[str, dict[str, float]] = {}
    for name, res in res_sets.items():
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        cider, per_image = Cider().compute_score(gts, res)
        scores["cider"] = float(cider)
        if cider_per_image is not None:  # Cider scores the images in the order of gts' keys
            cider_per_image[name] = {i: float(v) for i, v in zip(gts, per_image, strict=True)}
        out[name] = scores
    if meteor:
        for name, value in _meteor(gts, res_sets).items():
            out[name]["meteor"] = value
    return out
