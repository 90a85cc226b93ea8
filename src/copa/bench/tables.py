"""Markdown tables of benchmark records (what ``copa bench`` prints)."""

from __future__ import annotations

from typing import Any


def _g(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of inference records."""
    head = (
        "| prec | keep | vis. tokens | GFLOPs/pair | GFLOPs ViT/img | FLOP ratio | img/s (ViT) | pairs/s "
        "| speedup ViT | speedup e2e | efficiency | TFLOP/s | % matmul peak | peak MB | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        share = f"{100 * r['peak_share']:.0f}" if r.get("peak_share") else "-"
        lines.append(
            f"| {r['precision']} | {r['keep']} | {r['visual_tokens']} | {_g(r['flops'])} "
            f"| {_g(r['flops_vit'])} "
            f"| {r['flops_ratio']:.2f}x | {r['images_per_s']:.2f} | {r['pairs_per_s']:.2f} "
            f"| {r['speedup_vit']:.2f}x | {r['speedup_e2e']:.2f}x | {r['efficiency']:.2f} "
            f"| {r['achieved_flops_per_s'] / 1e12:.3f} | {share} | {_mb(r['peak_memory_mb'])} "
            f"| {_mb(r['peak_rss_mb'])} |"
        )
    return "\n".join(lines)


def format_train_table(records: list[dict[str, Any]]) -> str:
    head = (
        "| prec | keep | GFLOPs/sample (fwd+bwd) | FLOP ratio | samples/s | step ms | speedup "
        "| efficiency | peak MB | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        lines.append(
            f"| {r['precision']} | {r['keep']} | {_g(r['flops'])} | {r['flops_ratio']:.2f}x "
            f"| {r['samples_per_s']:.3f} | {r['time_step']['median_ms']:.0f} | {r['speedup']:.2f}x "
            f"| {r['efficiency']:.2f} | {_mb(r['peak_memory_mb'])} "
            f"| {_mb(r['peak_rss_mb'])} |"
        )
    return "\n".join(lines)
