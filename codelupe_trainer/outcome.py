"""What a cycle returns, and the one-screen summary `run-once` and the demo print of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Settings, metrics_file, wandb_directory


@dataclass
class CycleOutcome:
    status: str  # trained | nothing_to_do | interrupted | filtered_out
    message: str
    new_samples: int = 0
    run_number: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)



def describe_outcome(outcome: CycleOutcome, settings: Settings) -> str:
    """The one-screen summary printed by run-once."""
    if outcome.status != "trained":
        return outcome.message
    summary = outcome.summary
    before = summary.get("eval_loss_before")
    after = summary.get("eval_loss")
    lines = [
        f"run {summary['run_number']}: trained {summary['samples_trained']} samples "
        f"(+ {summary['eval_samples']} held out for evaluation) in {summary['steps']} steps, "
        f"{summary['train_seconds']:.1f} s on {summary['device']} (quantization: {summary['quantization']})",
        f"rows read: {summary['rows_examined']}; skipped {counts_in_words(summary['skipped'])}; "
        f"blocked {counts_in_words(summary['blocked'])}"
        + (f"; {summary['waiting_for_score']} waiting for a quality score" if summary.get("waiting_for_score") else ""),
        f"train loss: {summary['train_loss']:.4f}",
        eval_line(before, after),
        f"adapter: {summary['adapter']}" + (f" (continued from {summary['continued_from']})" if summary["continued_from"] else " (new)"),
        *promotion_lines(summary, settings),
        f"state: {settings.paths.state_file}",
        f"metrics: {metrics_file(settings)}; W&B dir: {wandb_directory(settings) / 'wandb'}",
    ]
    return "\n".join(lines)


def eval_line(before: float | None, after: float | None) -> str:
    if after is None:
        return "eval loss: no eval split"
    if before is None:  # 4-bit on a CPU: bitsandbytes repacks the weights for inference there (README)
        return f"eval loss: after {after:.4f} (before training: not measured for a 4-bit model on the CPU)"
    return f"eval loss: before {before:.4f} -> after {after:.4f}"


def promotion_lines(summary: dict[str, Any], settings: Settings) -> list[str]:
    lines = []
    if summary.get("replay_samples"):
        lines.append(f"replay: {summary['replay_samples']} older samples mixed in (not counted as new)")
    if settings.promotion.mode == "gate" and "promoted" in summary:
        verdict = "promoted: now `latest`" if summary["promoted"] else "REJECTED: `latest` still points at the adapter in use"
        lines.append(f"promotion gate: {verdict} ({summary.get('promotion_reason')})")
    return lines


def counts_in_words(counts: dict[str, int]) -> str:
    """{'too_short': 3, 'secrets': 0, 'low_quality': 1} -> '4 (3 too short, 1 low quality)'."""
    total = sum(counts.values())
    parts = [f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(counts.items(), key=lambda item: -item[1]) if count]
    return f"{total} ({', '.join(parts)})" if parts else "0"
