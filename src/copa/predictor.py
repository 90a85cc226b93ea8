"""Load a trained COPA model and ask it things: the high-level inference API.

    import copa
    model, transform, tokenizer = copa.load_model_and_transforms("runs/demo/finetune/vqa")
    p = copa.Predictor.from_pretrained("runs/demo/finetune/vqa")
    p.answer(["photo.png"], ["what color is the circle?"])        # -> ["red"]

Every method takes images as PIL images, paths or encoded bytes (one, or a list) and texts as
strings, runs in batches of ``batch_size`` on the predictor's device, and takes ``keep_ratio``
(None: the model's own; 1.0: unpruned). The work is the task code's (``copa.tasks``): the same
context, generation, box head and two-stage retrieval as ``copa evaluate``, on the same input
transform (``copa.preprocess``), so a prediction equals the evaluation's for the same image.

Pairing: ``answer``, ``ground`` and ``kept_patches`` pair image i with text i; one image with
several texts, or one text with several images, is broadcast.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from copa.model.copa import COPAModel
from copa.preprocess import ImageInput, ImageTransform, Tokenizer, open_image
from copa.tasks.base import DEFAULT_PROMPT, TaskOptions

log = logging.getLogger(__name__)


@dataclass
class Box:
    """A box in pixels of the original image (top-left origin); ``score`` is the box head's logit
    for the patch it was regressed from."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def xywh(self) -> list[float]:
        return [self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0]

    def to_dict(self) -> dict[str, Any]:
        def r(v: float) -> float:
            return round(float(v), 2)

        return {
            "box_xyxy": [r(self.x0), r(self.y0), r(self.x1), r(self.y1)],
            "box_xywh": [r(v) for v in self.xywh],
            "score": round(self.score, 4),
        }


@dataclass
class Retrieval:
    """Two-stage retrieval scores of I images and T texts.

    ``image_to_text`` (I, T) and ``text_to_image`` (T, I): final scores (re-ranked candidates =
    ITM log-odds + itc_weight x ITC similarity; the rest below them in ITC order); ``itc`` (I, T) the
    first-stage cosine similarities; ``itm_pairs``: how many pairs the ITM stage scored.
    """

    image_to_text: Tensor
    text_to_image: Tensor
    itc: Tensor
    itm_pairs: int = 0
    k: int = 5

    def top_texts(self, k: int | None = None) -> list[list[tuple[int, float]]]:
        """Per image: the best ``k`` (text index, score), best first."""
        return _top(self.image_to_text, k or self.k)

    def top_images(self, k: int | None = None) -> list[list[tuple[int, float]]]:
        """Per text: the best ``k`` (image index, score), best first."""
        return _top(self.text_to_image, k or self.k)


def _top(scores: Tensor, k: int) -> list[list[tuple[int, float]]]:
    vals, idx = scores.topk(min(k, scores.shape[1]), dim=1)
    return [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]


@dataclass
class Prepared:
    """Images opened and transformed once: ``pixels`` (B, 3, H, W) on the device, ``sizes`` the
    original (width, height) of each."""

    pixels: Tensor
    sizes: list[tuple[int, int]] = field(default_factory=list)


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pair(images: list[Any], texts: list[str]) -> tuple[list[int], list[str]]:
    """Image row per pair and the text per pair, broadcasting a single image or text."""
    if len(images) == len(texts):
        return list(range(len(images))), texts
    if len(images) == 1:
        return [0] * len(texts), texts
    if len(texts) == 1:
        return list(range(len(images))), texts * len(images)
    raise ValueError(
        f"{len(images)} images and {len(texts)} texts: give one text per image, or one of either"
    )


class Predictor:
    """High-level inference on a loaded ``COPAModel`` (see the module docstring).

    Args:
        model: the model (put on ``device`` and into eval mode here).
        device: "cpu", "cuda", "cuda:1", ... (default: CUDA when available).
        batch_size: images (or image-text pairs) per forward pass.
        options: task options (captioning prompt, decoding); a fine-tuned model's saved ones by
            default (``from_pretrained``).
        precision: "fp32", "bf16" or "auto" (bf16 where the device runs it fast).
    """

    def __init__(
        self,
        model: COPAModel,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        options: TaskOptions | None = None,
        precision: str = "fp32",
        task: str | None = None,
    ) -> None:
        from copa.utils.device import default_device, resolve_precision

        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.transform = ImageTransform.from_config(model.cfg)
        self.tokenizer = Tokenizer.from_config(model.cfg)
        self.batch_size = max(1, int(batch_size))
        self.options = options or TaskOptions()
        self.dtype = resolve_precision(precision, self.device)
        self.task = task  # what the checkpoint was fine-tuned for (None: pre-trained)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, device: str | torch.device | None = None, **kw: Any
    ) -> Predictor:
        """A predictor for a saved model: a local directory (a training run's ``OUT`` or its
        ``OUT/model``) or a hub id (``copa.hub``); a fine-tuned model's task options come along."""
        from copa.hub import resolve_checkpoint
        from copa.tasks.finetune import saved_meta

        path = resolve_checkpoint(name_or_path)
        meta = saved_meta(path)
        saved = meta.get("options") or {}
        options = TaskOptions(**{k: v for k, v in saved.items() if k in TaskOptions.__dataclass_fields__})
        return cls(
            COPAModel.from_pretrained(path),
            device,
            options=kw.pop("options", options),
            task=meta.get("task"),
            **kw,
        )

    # ------------------------------------------------------------------ plumbing
    @property
    def grid(self) -> int:
        """Patches per side of the model's input."""
        return self.model.cfg.vision.image_size // self.model.cfg.vision.patch_size

    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> Prepared:
        """Open and transform images -> ``Prepared`` on the device. Raises ``ImageError``."""
        opened = [open_image(im) for im in _as_list(images)]
        pixels = self.transform.batch(opened).to(self.device)
        return Prepared(pixels, [im.size for im in opened])

    def _prepared(self, images: Any) -> Prepared:
        return images if isinstance(images, Prepared) else self.prepare(images)

    @contextlib.contextmanager
    def keep_ratio(self, ratio: float | None) -> Iterator[None]:
        """Run the block at keep ratio ``ratio`` (None: the model's own), restoring it after."""
        if ratio is None:
            yield
            return
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep ratio {ratio} is outside (0, 1]")
        saved = self.model.keep_ratios
        self.model.set_keep_ratio(ratio)
        try:
            yield
        finally:
            self.model.set_keep_ratio(saved)

    @contextlib.contextmanager
    def inference(self, keep_ratio: float | None) -> Iterator[None]:
        """Inference mode, keep ratio ``keep_ratio`` (None: the model's) and the predictor's precision."""
        from copa.utils.device import autocast

        with torch.inference_mode(), self.keep_ratio(keep_ratio), autocast(self.device, self.dtype):
            yield

    def _tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer(texts)
        return ids.to(self.device), mask.to(self.device)

    def _chunks(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(n, s + self.batch_size))

    # ------------------------------------------------------------------ tasks
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        keep_ratio: float | None = None,
        decode: str | None = None,
        prompt: str | None = None,
        beam_size: int = 3,
        max_new_tokens: int = 30,
    ) -> list[str]:
        """One caption per image: text-agnostic selection, the prompt through the encoders, beam
        search (``decode="greedy"`` for greedy)."""
        from copa.tasks.caption import CaptionTask
        from copa.tasks.generation import generate

        prep = self._prepared(images)
        opts = TaskOptions(
            **{**self.options.to_dict(), "prompt": prompt or self.options.prompt or DEFAULT_PROMPT}
        )
        task, mode = CaptionTask(opts), decode or self.options.decode or "beam"
        out: list[str] = []
        with self.inference(keep_ratio):
            for s in self._chunks(len(prep.sizes)):
                ctx, cmask = task.context(self.model, prep.pixels[s])
                out += generate(self.model, ctx, cmask, mode, beam_size, max_new_tokens)
        return out

    def answer(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        keep_ratio: float | None = None,
        decode: str | None = None,
        answer_list: Sequence[str] | None = None,
        max_new_tokens: int = 10,
    ) -> list[str]:
        """One answer per (image, question) pair: the question queries the TPD, the decoder
        generates (greedy by default), or ``answer_list`` is ranked by likelihood."""
        from copa.tasks.generation import generate, rank_candidates, tokenize
        from copa.tasks.vqa import question_context

        prep = self._prepared(images)
        rows, qs = _pair(prep.sizes, _as_list(questions))
        mode = decode or (self.options.decode if self.options.decode in ("greedy", "beam") else "greedy")
        out: list[str] = []
        with self.inference(keep_ratio):
            if answer_list:
                cand_ids, cand_mask = tokenize(self.model, list(answer_list), self.device)
            for s in self._chunks(len(qs)):
                ids, mask = self._tokens(qs[s])
                ctx, cmask = question_context(self.model, prep.pixels[rows[s]], ids, mask)
                if answer_list:
                    best = rank_candidates(self.model, ctx, cmask, cand_ids, cand_mask).argmax(1).tolist()
                    out += [answer_list[j] for j in best]
                else:
                    out += generate(self.model, ctx, cmask, mode, 3, max_new_tokens)
        return out

    def ground(
        self,
        images: ImageInput | Sequence[ImageInput],
        phrases: str | Sequence[str],
        keep_ratio: float | None = None,
    ) -> list[Box]:
        """The box each phrase refers to, in pixels of its original image."""
        from copa.tasks.box_ops import cxcywh_to_xyxy
        from copa.tasks.grounding import ground_pairs

        prep = self._prepared(images)
        rows, texts = _pair(prep.sizes, _as_list(phrases))
        out: list[Box] = []
        with self.inference(keep_ratio):
            for s in self._chunks(len(texts)):
                ids, mask = self._tokens(texts[s])
                g = ground_pairs(self.model, prep.pixels[rows[s]], ids, mask)
                xyxy = cxcywh_to_xyxy(g.box.float()).clamp(0.0, 1.0).cpu()
                best = g.scores.float().max(1).values.cpu()
                for j, r in enumerate(rows[s]):
                    w, h = prep.sizes[r]
                    x0, y0, x1, y1 = xyxy[j].tolist()
                    out.append(Box(x0 * w, y0 * h, x1 * w, y1 * h, float(best[j])))
        return out

    def kept_patches(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str | None] | None = None,
        keep_ratio: float | None = None,
    ) -> list[list[int]]:
        """The patches the selection keeps (row-major indices on the ``grid`` x ``grid`` map, highest
        score first), per (image, text) pair; ``texts=None`` (or a None entry) uses the text-agnostic
        query. Every patch when the model does not prune."""
        prep = self._prepared(images)
        rows, ts = _pair(prep.sizes, _as_list(texts))
        n = self.grid**2
        out: list[list[int]] = []
        with self.inference(keep_ratio):
            for s in self._chunks(len(ts)):
                prefix = self.model.image_prefix(prep.pixels[rows[s]])
                chunk = ts[s]
                if any(t is None for t in chunk):  # text-agnostic rows run on their own
                    for j, t in enumerate(chunk):
                        out.append(self._kept(prefix[j : j + 1], None if t is None else [t], n)[0])
                else:
                    out += self._kept(prefix, list(chunk), n)
        return out

    def _kept(self, prefix: Tensor, texts: list[str] | None, n: int) -> list[list[int]]:
        query = None
        if texts is not None:
            ids, mask = self._tokens(texts)
            query = self.model.text_query(self.model.text_states(ids, mask), mask)
        kept = self.model.image_tokens(prefix, query).kept
        if kept is None:
            return [list(range(n)) for _ in range(prefix.shape[0])]
        return kept.tolist()

    def retrieve(
        self,
        images: ImageInput | Sequence[ImageInput],
        texts: str | Sequence[str],
        k: int = 5,
        keep_ratio: float | None = None,
        itm_topk: int = 16,
        itc_weight: float | None = None,
    ) -> Retrieval:
        """Two-stage retrieval between ``images`` and ``texts`` (as ``copa evaluate retrieval``):
        ITC with the text-agnostic image embedding ranks everything; each query's ``itm_topk`` best
        candidates are re-scored by ITM with text-aware selection, each image's ViT prefix computed
        once for all its candidate texts."""
        from copa.tasks.retrieval import itm_scores_shared_prefix, rerank_candidates

        prep = self._prepared(images)
        ts = _as_list(texts)
        ids, mask = self._tokens(ts)
        weight = self.options.itc_weight if itc_weight is None else itc_weight
        with self.inference(keep_ratio):
            img = torch.cat(
                [self.model.encode_image(prep.pixels[s]).float() for s in self._chunks(len(prep.sizes))]
            )
            txt = torch.cat([self.model.encode_text(ids[s], mask[s]).float() for s in self._chunks(len(ts))])
            sim = (img @ txt.t()).cpu()
            cand = rerank_candidates(sim, itm_topk)
            itm = torch.zeros(cand.pairs.shape[0])
            for s in self._chunks(len(prep.sizes)):  # a chunk of images with all their candidate pairs
                sel = ((cand.pairs[:, 0] >= s.start) & (cand.pairs[:, 0] < s.stop)).nonzero().squeeze(1)
                if sel.numel():
                    pi = (cand.pairs[sel, 0] - s.start).to(self.device)
                    itm[sel] = (
                        itm_scores_shared_prefix(
                            self.model,
                            prep.pixels[s],
                            ids,
                            mask,
                            pi,
                            cand.pairs[sel, 1].to(self.device),
                            self.batch_size,
                        )
                        .float()
                        .cpu()
                    )
        i2t, t2i = cand.final_scores(sim, itm, weight)
        return Retrieval(i2t, t2i, sim, int(cand.pairs.shape[0]), k)

    # ------------------------------------------------------------------ pictures
    def overlay(
        self, image: ImageInput, kept: Sequence[int], size: int = 384, box: Box | None = None
    ) -> Image.Image:
        """The image resized to about ``size`` px with the dropped patches dimmed (``kept``: patch
        indices as ``kept_patches`` returns them) and, optionally, a box drawn on it."""
        import numpy as np
        from PIL import ImageDraw

        from copa.viz import overlay_kept

        img = open_image(image)
        g = self.grid
        side = max(g, round(size / g) * g)  # a whole number of pixels per patch
        shown = img.resize((side, side), Image.Resampling.BICUBIC)
        out = Image.fromarray(overlay_kept(np.asarray(shown), kept, g))
        if box is not None:
            sx, sy = side / img.width, side / img.height
            ImageDraw.Draw(out).rectangle(
                [box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy], outline=(255, 40, 40), width=3
            )
        return out


def load_model_and_transforms(
    name_or_path: str | Path, device: str | torch.device = "cpu"
) -> tuple[COPAModel, ImageTransform, Tokenizer]:
    """open_clip's ``create_model_and_transforms`` for COPA: the model (eval mode, on ``device``),
    its image transform (PIL -> (3, H, W), from the checkpoint's own preprocessing) and its
    tokenizer (strings -> ids, mask). ``name_or_path``: a local directory or a hub id."""
    from copa.hub import resolve_checkpoint

    model = COPAModel.from_pretrained(resolve_checkpoint(name_or_path)).to(device).eval()
    return model, ImageTransform.from_config(model.cfg), Tokenizer.from_config(model.cfg)
