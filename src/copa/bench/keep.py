"""Keep settings of ``copa bench``: where to select and how much to keep (``--keep 4:0.7,8:0.5``)."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)


class BenchError(ValueError):
    """A bad benchmark argument (keep setting, batch size, precision)."""


@dataclass(frozen=True)
class KeepSetting:
    """Where to select and how much to keep, and with which selector (None: the config's).
    ``layers`` = () means unpruned (selector ``none``)."""

    layers: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()
    selector: str | None = None

    @property
    def pruned(self) -> bool:
        return bool(self.layers) and any(r < 1.0 for r in self.ratios)

    @property
    def name(self) -> str:
        if not self.layers:
            return "none"
        spec = ",".join(f"{layer}:{_fmt_ratio(r)}" for layer, r in zip(self.layers, self.ratios, strict=True))
        return spec if self.selector is None else f"{self.selector}@{spec}"


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def parse_keep(spec: str, num_layers: int | None = None) -> KeepSetting:
    """Parse one ``--keep`` value.

    ``"none"`` -> unpruned; ``"6:0.5"`` -> select before block 6 (0-based, i.e. after 6 blocks),
    keep 50 %; ``"4:0.7,8:0.5"`` -> two stages, each ratio of the patches entering that stage.
    Layers must increase and lie in ``(0, num_layers)``; ratios in ``(0, 1]``. A ``SELECTOR@`` prefix
    (``"tome@3:0.5"``, ``"random@3:0.5"``) uses that selector instead of the config's, so selectors
    are compared in one run on the same weights.
    """
    from copa.model.selection import SELECTORS

    text = spec.strip().lower()
    if text in ("none", "unpruned", "full"):
        return KeepSetting()
    selector = None
    if "@" in text:
        selector, text = (s.strip() for s in text.split("@", 1))
        choices = [s for s in SELECTORS if s != "none"]
        if selector not in choices:
            raise BenchError(
                f"bad keep setting {spec!r}: unknown selector {selector!r}; expected one of "
                f"{', '.join(choices)} (the unpruned model is 'none')"
            )
    if not text:
        raise BenchError("empty keep setting; use 'none' or LAYER:RATIO[,LAYER:RATIO...] such as '6:0.5'")
    layers: list[int] = []
    ratios: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if part.count(":") != 1:
            raise BenchError(
                f"bad keep setting {spec!r}: {part!r} is not LAYER:RATIO (e.g. '6:0.5' or '4:0.7,8:0.5')"
            )
        a, b = (s.strip() for s in part.split(":"))
        try:
            layer = int(a)
        except ValueError:
            raise BenchError(f"bad keep setting {spec!r}: layer {a!r} is not an integer") from None
        try:
            ratio = float(b)
        except ValueError:
            raise BenchError(f"bad keep setting {spec!r}: ratio {b!r} is not a number") from None
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise BenchError(f"bad keep setting {spec!r}: ratio {b} must be in (0, 1]")
        if layer <= 0 or (num_layers is not None and layer >= num_layers):
            hi = f"{num_layers - 1}" if num_layers is not None else "L-1"
            raise BenchError(
                f"bad keep setting {spec!r}: layer {layer} must be in 1..{hi} (selection before that block)"
            )
        layers.append(layer)
        ratios.append(ratio)
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise BenchError(f"bad keep setting {spec!r}: layers must strictly increase, got {layers}")
    return KeepSetting(tuple(layers), tuple(ratios), selector)


def parse_keeps(specs: list[str], num_layers: int | None = None) -> list[KeepSetting]:
    """Parse every ``--keep`` value; the unpruned setting is always first, duplicates are dropped."""
    out = [KeepSetting()]
    for spec in specs:
        s = parse_keep(spec, num_layers)
        if s.layers and not s.pruned:  # ratio 1.0 everywhere: the unpruned model by construction
            log.warning("keep setting %r prunes nothing; it equals the unpruned model", spec)
        if s not in out:
            out.append(s)
    return out
