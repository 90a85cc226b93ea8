"""Image-text retrieval: fine-tune with ITC + ITM (hard negatives), evaluate in two stages.

Fine-tuning reuses the pre-training objective with only its ITC and ITM terms
(``copa.train.losses.PretrainObjective``): in-batch InfoNCE with the text-agnostic image embedding,
and ITM on each positive pair plus one hard negative text per image and one hard negative image per
text, sampled from the ITC similarities, each negative re-running the TPD with its own text.

Evaluation (``evaluate``):

1. **ITC ranking.** Every image is embedded once with the text-agnostic query, every text once;
   similarity = cosine of the ITC projections, (I, T).
2. **ITM re-ranking.** For each image query its ``eval.itm_topk`` most similar texts, for each text
   query its top-k images, are re-scored by ITM with text-aware selection. The union of these
   (image, text) pairs is scored once per pair, grouped by image: each image's text-independent ViT
   prefix runs once and is indexed for all its candidate texts; each distinct text is encoded once
   for the whole stage; the pairs run through selection + ViT suffix + fusion + ITM head in
   batches of ``eval.batch_size`` pairs that cross image and query boundaries
   (``itm_scores_batched``), so every forward but the last is full.

**Final score** of a re-ranked candidate = ITM log-odds ``logit_match - logit_nomatch`` +
``itc_weight`` x ITC cosine similarity (ALBEF's practice; ``itc_weight = 0`` gives pure ITM).
Candidates outside a query's top-k keep their ITC order, below every re-ranked one.

Multi-process: stage 1 and stage 2 each split their work by rank (round robin over images / texts)
and end in exactly one ``gather_objects`` each, called by every rank, so no rank can wait on a
collective the others skip; every rank then holds identical score matrices.

Captions: an image has several; an image->text hit is any of its captions, a text->image hit is its
own image (``copa.tasks.metrics``, pessimistic tie policy). Baseline: the exact expected recall of a
uniformly random ranking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from copa.config import Config
from copa.data.collate import Batch
from copa.data.dataset import PretrainDataset
from copa.data.records import Record
from copa.model.copa import COPAModel
from copa.tasks.base import EvalEnv, EvalResult, Task, eval_loader, expanded_dataset, only, shard_indices
from copa.tasks.metrics import query_recall_units, random_retrieval_baseline, retrieval_metrics
from copa.train import distributed as D

TOP_IN_PREDICTIONS = 5
_BELOW = 1e4  # offset that puts candidates outside the top-k below every re-ranked one


@dataclass
class RetrievalData:
    """Evaluation gallery: ``images`` (the dataset; row ``image_rows[i]`` is distinct image i),
    ``texts`` (T,) and ``text_image`` (T,) long, the image each text describes."""

    dataset: PretrainDataset
    image_rows: list[int]
    texts: list[str]
    text_image: Tensor

    @property
    def num_images(self) -> int:
        return len(self.image_rows)

    def image_path(self, i: int) -> str:
        return self.dataset.records[self.image_rows[i]].image


@dataclass
class Candidates:
    """Which (image, text) pairs the ITM stage re-scores: each image query's top-k texts
    ``i2t`` (I, T) bool, each text query's top-k images ``t2i`` (T, I) bool, and their union as
    ``pairs`` (P, 2) [image, text], each pair once."""

    i2t: Tensor
    t2i: Tensor
    pairs: Tensor

    def final_scores(self, sim: Tensor, itm: Tensor, itc_weight: float) -> tuple[Tensor, Tensor]:
        """ITC similarities ``sim`` (I, T) and the ITM log-odds of ``pairs`` (P,) -> image->text
        (I, T) and text->image (T, I) scores: re-ranked candidates = ITM + itc_weight * ITC, the
        others keep their ITC order below every re-ranked one."""
        itm_mat = torch.zeros_like(sim)
        itm_mat[self.pairs[:, 0], self.pairs[:, 1]] = itm.to(sim.dtype)
        reranked = itm_mat + itc_weight * sim
        i2t = torch.where(self.i2t, reranked, sim - _BELOW)
        t2i = torch.where(self.t2i, reranked.t(), sim.t() - _BELOW)
        return i2t, t2i


def rerank_candidates(sim: Tensor, topk: int) -> Candidates:
    """The pairs to re-rank from ITC similarities ``sim`` (I, T): top-``topk`` per query both ways."""
    n_img, n_txt = sim.shape
    k_txt, k_img = min(topk, n_txt), min(topk, n_img)
    i2t = torch.zeros(n_img, n_txt, dtype=torch.bool).scatter_(1, sim.topk(k_txt, dim=1).indices, True)
    t2i = torch.zeros(n_txt, n_img, dtype=torch.bool).scatter_(1, sim.t().topk(k_img, dim=1).indices, True)
    return Candidates(i2t, t2i, (i2t | t2i.t()).nonzero())


def stack_images(samples: list[dict[str, Any]]) -> Tensor:
    """collate_fn: sample dicts -> images (B, 3, H, W)."""
    return torch.stack([s["image"] for s in samples])


ImageChunk = tuple[list[int], Tensor]  # gallery indices of m images, the images (m, 3, H, W)
Region = Callable[[str], AbstractContextManager[Any]]


def _no_region(_name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@torch.no_grad()
def itm_scores_batched(
    model: COPAModel,
    chunks: Iterable[ImageChunk],
    pairs: Tensor,
    ids: Tensor,
    mask: Tensor,
    batch_size: int = 64,
    reuse_prefix: bool = True,
    region: Region = _no_region,
) -> Tensor:
    """ITM log-odds of (image, text) pairs, batched across queries.

    chunks: the images named in ``pairs``, each exactly once, as (gallery indices, images
    (m, 3, H, W) on the model's device); pairs: (P, 2) [gallery image, row of ``ids``]; ids, mask:
    (T, L) the tokenized texts, on the model's device -> (P,) float32 ``logit_match -
    logit_nomatch`` on the CPU, in the order of ``pairs``.

    - Each distinct text of ``pairs`` is encoded once (text states + TPD query, in batches of
      ``batch_size``) and kept for the whole call: (U, L, D) memory for U distinct texts.
    - With ``reuse_prefix`` each chunk's text-independent ViT prefix runs once and is indexed per
      pair; without it the prefix is re-run on every pair's image (what reuse saves; the same
      scores up to float rounding).
    - Pairs run through selection + ViT suffix + fusion + ITM head in forwards of ``batch_size``
      pairs taken in image order across chunk (and so query) boundaries: only the very last forward
      is smaller, so a chunk whose images have few candidates leaves no half-empty batch behind.

    ``region(name)`` wraps every model call (name "text", "prefix" or "pairs"): the caller's
    stopwatch and autocast. Equal up to float rounding to ``model(images[i], ids[t], mask[t])``
    followed by the ITM head, pair by pair.
    """
    n_pairs = pairs.shape[0]
    out = torch.full((n_pairs,), float("nan"))
    if n_pairs == 0:
        return out
    device = ids.device
    pairs = pairs.cpu()
    by_image: dict[int, list[int]] = {}
    for p, i in enumerate(pairs[:, 0].tolist()):
        by_image.setdefault(i, []).append(p)
    texts, inverse = pairs[:, 1].unique(return_inverse=True)  # inverse (P,): row in the text cache
    states, queries = [], []
    for s in range(0, texts.shape[0], batch_size):
        t = texts[s : s + batch_size].to(device)
        with region("text"):
            st = model.text_states(ids[t], mask[t])  # (u, L, D)
            queries.append(model.text_query(st, mask[t]))  # (u, Dq)
        states.append(st)
    txt, query, txt_mask = torch.cat(states), torch.cat(queries), mask[texts.to(device)]

    # pending segments: (prefixes (m, 1+N, D) or images (m, 3, H, W), row per pair (n,), pair ids (n,))
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    results: list[tuple[Tensor, Tensor]] = []

    def run(n: int) -> None:
        """Score the first ``n`` pending pairs in one forward."""
        segs, pids, need = [], [], n
        while need:
            src, rows, pid = pending[0]
            take = min(need, rows.shape[0])
            segs.append((src, rows[:take]))
            pids.append(pid[:take])
            if take == rows.shape[0]:
                pending.pop(0)
            else:
                pending[0] = (src, rows[take:], pid[take:])
            need -= take
        p = torch.cat(pids)
        ti = inverse[p].to(device)
        if reuse_prefix:
            with region("pairs"):  # indexing the shared prefixes is part of the per-pair work
                prefix = torch.cat([src[rows] for src, rows in segs])  # (n, 1+N, D)
        else:
            with region("prefix"):  # the prefix again for every pair
                prefix = model.image_prefix(torch.cat([src[rows] for src, rows in segs]))
        with region("pairs"):
            vis = model.image_tokens(prefix, query[ti])  # text-aware selection per pair
            logits = model.itm_logits(model.fuse(vis, txt[ti], txt_mask[ti])).float()
        results.append((p, logits[:, 1] - logits[:, 0]))

    queued = 0
    for gallery, x in chunks:
        local = {int(img): j for j, img in enumerate(gallery)}
        pid = torch.tensor([p for img in gallery for p in by_image.get(int(img), [])], dtype=torch.long)
        if not pid.numel():
            continue
        rows = torch.tensor([local[i] for i in pairs[pid, 0].tolist()], device=device)
        if reuse_prefix:
            with region("prefix"):
                src = model.image_prefix(x)  # (m, 1+N, D): once per image
        else:
            src = x
        pending.append((src, rows, pid))
        queued += pid.shape[0]
        while queued >= batch_size:
            run(batch_size)
            queued -= batch_size
    if queued:
        run(queued)
    for p, sc in results:
        out[p] = sc.cpu()
    return out


@torch.no_grad()
def itm_scores_shared_prefix(
    model: COPAModel,
    images: Tensor,
    ids: Tensor,
    mask: Tensor,
    pair_image: Tensor,
    pair_text: Tensor,
    batch_size: int = 64,
) -> Tensor:
    """ITM log-odds of (image, text) pairs, running each image's ViT prefix and each text once.

    images: (M, 3, H, W) distinct images; ids, mask: (T, L) texts; pair_image (P,) rows of
    ``images``, pair_text (P,) rows of ``ids`` -> (P,) float32 ``logit_match - logit_nomatch`` on
    ``images``' device. Equal (up to float rounding) to ``model(images[pair_image], ids[pair_text],
    mask[pair_text])`` followed by the ITM head. One chunk of ``itm_scores_batched``.
    """
    pairs = torch.stack([pair_image.cpu(), pair_text.cpu()], dim=1)
    chunk = (list(range(images.shape[0])), images)
    return itm_scores_batched(model, [chunk], pairs, ids, mask, batch_size).to(images.device)


class RetrievalTask(Task):
    name = "retrieval"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._objective: Any = None

    # ------------------------------------------------------------------ data
    def build_dataset(self, cfg: Config, split: str, train: bool, image_size: int, patch_size: int) -> Any:
        def expand(rec: Record) -> list[Record]:
            return [only(rec, captions=rec.captions)] if rec.captions else []

        ds = expanded_dataset(cfg, split, train, image_size, patch_size, expand, self.options.random_crop)
        if train:  # one sample per record, a random caption each time
            return ds
        rows: dict[int, int] = {}
        texts: list[str] = []
        owner: list[int] = []
        for r, (rec, img) in enumerate(zip(ds.records, ds.image_ids, strict=True)):
            rows.setdefault(img, r)  # records naming the same image file pool their captions
            texts += rec.captions
            owner += [img] * len(rec.captions)
        return RetrievalData(
            ds, [rows[i] for i in range(len(rows))], texts, torch.tensor(owner, dtype=torch.long)
        )

    # ------------------------------------------------------------------ training
    def loss(self, model: COPAModel, batch: Batch) -> dict[str, Tensor]:
        from copa.train.losses import PretrainObjective

        if self._objective is None or self._objective.model is not model:
            self._objective = PretrainObjective(model, {"itc": 1.0, "itm": 1.0})
        out = self._objective(batch)
        return {"loss": out.loss, **out.losses}

    # ------------------------------------------------------------------ evaluation
    def _images(self, data: RetrievalData, images: list[int], env: EvalEnv) -> Any:
        """(image indices, images on device) in chunks of the eval batch size."""
        bs = env.ev.batch_size
        rows = [data.image_rows[i] for i in images]
        loader = eval_loader(data.dataset, rows, bs, stack_images, env.cfg.data.num_workers)
        for s, x in zip(range(0, len(images), bs), loader, strict=True):
            yield images[s : s + bs], x.to(env.device)

    def _stage1(
        self, model: COPAModel, data: RetrievalData, ids: Tensor, mask: Tensor, env: EvalEnv
    ) -> tuple[Tensor, Tensor, float]:
        """Text-agnostic image and text ITC embeddings (I, E), (T, E) on every rank; model seconds."""
        my_img, my_txt = shard_indices(data.num_images), shard_indices(len(data.texts))
        img_parts, txt_parts = [], []
        with torch.no_grad():
            for _, x in self._images(data, my_img, env):
                with env.watch, env.autocast():
                    img_parts.append(model.encode_image(x).float().cpu())
            for s in range(0, len(my_txt), env.ev.batch_size):
                t = torch.tensor(my_txt[s : s + env.ev.batch_size], device=env.device)
                with env.watch, env.autocast():
                    txt_parts.append(model.encode_text(ids[t], mask[t]).float().cpu())
        e = model.cfg.embed_dim
        local = (
            my_img,
            torch.cat(img_parts) if img_parts else torch.zeros(0, e),
            my_txt,
            torch.cat(txt_parts) if txt_parts else torch.zeros(0, e),
            env.watch.seconds,
        )
        img = torch.zeros(data.num_images, e)
        txt = torch.zeros(len(data.texts), e)
        seconds = 0.0
        for ii, ie, ti, te, sec in D.gather_objects(local):  # collective 1 of 2
            img[ii], txt[ti] = ie, te
            seconds = max(seconds, sec)
        return img, txt, seconds

    def _stage2(
        self, model: COPAModel, data: RetrievalData, ids: Tensor, mask: Tensor, pairs: Tensor, env: EvalEnv
    ) -> tuple[Tensor, float]:
        """ITM log-odds of ``pairs`` (P, 2) [image, text]; each rank scores the pairs of its images,
        batched across queries (``itm_scores_batched``)."""
        start = env.watch.seconds
        mine = torch.tensor(shard_indices(data.num_images), dtype=torch.long)
        sel = torch.isin(pairs[:, 0], mine).nonzero().squeeze(1)  # this rank's pairs, in image order
        images = pairs[sel, 0].unique().tolist()

        @contextlib.contextmanager
        def timed(_name: str) -> Iterator[None]:
            with env.watch, env.autocast():
                yield

        scores = itm_scores_batched(
            model, self._images(data, images, env), pairs[sel], ids, mask, env.ev.batch_size, region=timed
        )
        local_res = (sel.tolist(), scores, env.watch.seconds - start)
        out = torch.full((pairs.shape[0],), float("nan"))
        seconds = 0.0
        for idx, sc, sec in D.gather_objects(local_res):  # collective 2 of 2
            out[torch.tensor(idx, dtype=torch.long)] = sc
            seconds = max(seconds, sec)
        return out, seconds

    def evaluate(self, model: COPAModel, data: RetrievalData, env: EvalEnv) -> EvalResult:
        n_img, n_txt = data.num_images, len(data.texts)
        ids, mask = env.collator(model).tokenize(data.texts)  # once, so every stage sees the same padding
        ids, mask = ids.to(env.device), mask.to(env.device)
        img, txt, t1 = self._stage1(model, data, ids, mask, env)
        sim = img @ txt.t()  # (I, T) cosine similarities
        cand = rerank_candidates(sim, env.ev.itm_topk)
        itm, t2 = self._stage2(model, data, ids, mask, cand.pairs, env)
        i2t, t2i = cand.final_scores(sim, itm, self.options.itc_weight)
        pairs = cand.pairs
        metrics: dict[str, Any] = retrieval_metrics(i2t, t2i, data.text_image)
        metrics.update({f"itc_{k}": v for k, v in retrieval_metrics(sim, sim.t(), data.text_image).items()})
        metrics.update(
            {f"baseline_{k}": v for k, v in random_retrieval_baseline(data.text_image, n_img).items()}
        )
        seconds = t1 + t2
        metrics.update(
            {
                "itm_topk": env.ev.itm_topk,
                "itc_weight": self.options.itc_weight,
                "num_images": n_img,
                "num_texts": n_txt,
                "itm_pairs": int(pairs.shape[0]),
                "stage1_s": round(t1, 4),
                "stage2_s": round(t2, 4),
                "itm_pairs_per_s": pairs.shape[0] / max(t2, 1e-9),
                # queries (images + texts) per second of model time over both stages
                "num_samples": n_img + n_txt,
                "model_time_s": round(seconds, 4),
                "samples_per_s": (n_img + n_txt) / max(seconds, 1e-9),
            }
        )
        return EvalResult(metrics, self._predictions(data, i2t, t2i))

    def _predictions(self, data: RetrievalData, i2t: Tensor, t2i: Tensor) -> list[dict[str, Any]]:
        """Top candidates of every query, readable: captions for image queries, paths for text queries;
        ``unit`` (weight ``unit_weight``, ``group`` its image) is the query's share of ``r_mean``
        (``metrics.paired_bootstrap``)."""
        owner = data.text_image.tolist()
        img_units, txt_units = query_recall_units(i2t, t2i, data.text_image)
        w_img, w_txt = 0.5 / len(img_units), 0.5 / len(txt_units)

        def top(scores: Tensor, name: Any, correct: Any) -> list[list[dict[str, Any]]]:
            vals, idx = scores.topk(min(TOP_IN_PREDICTIONS, scores.shape[1]), dim=1)
            return [
                [
                    {**name(j), "score": round(v, 4), "correct": correct(q, j)}
                    for v, j in zip(vs, js, strict=True)
                ]
                for q, (vs, js) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True))
            ]

        by_image = top(i2t, lambda j: {"text": data.texts[j]}, lambda q, j: owner[j] == q)
        by_text = top(t2i, lambda j: {"image": data.image_path(j)}, lambda q, j: owner[q] == j)
        return [
            {
                "query": "image",
                "image": data.image_path(i),
                "top": t,
                "unit": u,
                "unit_weight": w_img,
                "group": i,
            }
            for i, (t, u) in enumerate(zip(by_image, img_units, strict=True))
        ] + [
            {
                "query": "text",
                "text": data.texts[q],
                "top": t,
                "unit": u,
                "unit_weight": w_txt,
                "group": owner[q],
            }
            for q, (t, u) in enumerate(zip(by_text, txt_units, strict=True))
        ]
