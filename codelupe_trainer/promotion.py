"""The promotion gate: does the adapter a run trained replace the one in service? Pure functions, no I/O.

Both adapters are evaluated on the same fixed holdout in the same process (training/loop.py); the adapter in
use is the weights the run started from (a run continues from it), or the base model for the first adapter.
The candidate is promoted only if its overall holdout loss (the token-weighted mean over languages) rises by
at most `max_loss_increase` (relative) and no language's loss rises by more than `max_language_loss_increase`.

Per-run tolerances compound: three promotions each 3 % worse on one language are 9 % worse together. So each
language also has an anchor, the best loss any adapter in service reached on it (the base model counts, before
the first adapter); no candidate may be more than `max_drift` above it. An anchor is only compared with
measurements on the same holdout: its fingerprint (the language's holdout ids, the base model, max_length)
must match, else the language starts a new anchor from today's measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import PromotionSettings
from .data.languages import language_keys

LanguageLosses = dict[str, tuple[float, int]]  # language -> (mean token loss, tokens)
# language -> [best loss of an adapter in service, holdout fingerprint, the run that reached it (0: the base)]
Anchors = dict[str, list]


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate_loss: float | None = None
    in_use_loss: float | None = None
    # In use minus candidate: positive when the candidate is better.
    margin: float | None = None
    candidate_languages: dict[str, float] = field(default_factory=dict)
    in_use_languages: dict[str, float] = field(default_factory=dict)


def overall_loss(losses: LanguageLosses) -> float:
    tokens = sum(count for _, count in losses.values())
    return sum(loss * count for loss, count in losses.values()) / tokens if tokens else math.nan


def comparable_anchors(anchors: Anchors, fingerprints: dict[str, str]) -> dict[str, float]:
    """The anchors measured on the holdout as it is today: {language: best loss}."""
    return {language: entry[0] for language, entry in anchors.items() if fingerprints.get(language) == entry[1]}


def update_anchors(anchors: Anchors, fingerprints: dict[str, str], in_use: LanguageLosses | None, in_use_run: int,
                   candidate: LanguageLosses | None, promoted: bool, run: int) -> Anchors:
    """The anchors after a run: the adapter in use was measured (it is in service), and so was a promoted
    candidate; an anchor whose holdout changed is replaced by today's measurement."""
    updated = {language: entry for language, entry in anchors.items() if fingerprints.get(language) == entry[1]}
    for losses, source in ((in_use, in_use_run), (candidate if promoted else None, run)):
        for language, (loss, _) in (losses or {}).items():
            if language in fingerprints and math.isfinite(loss) and (language not in updated
                                                                     or loss < updated[language][0]):
                updated[language] = [loss, fingerprints[language], source]
    return updated


def decide_promotion(settings: PromotionSettings, in_use: LanguageLosses | None,
                     candidate: LanguageLosses | None, best: dict[str, float] | None = None) -> Decision:
    """`best`: the comparable anchors ({language: best loss of an adapter in service on today's holdout})."""
    if settings.mode == "always":
        return _decision(True, "promotion.mode = always", in_use, candidate)
    if not in_use or not candidate:
        # Nothing measured to compare (an empty holdout: its rows were deleted from the table); said loudly.
        return _decision(True, "no holdout loss to compare on: promoted unchecked", in_use, candidate)
    decision = _decision(True, "", in_use, candidate)
    if not math.isfinite(decision.candidate_loss):
        decision.promoted, decision.reason = False, "the candidate's holdout loss is not finite"
        return decision
    limit = decision.in_use_loss * (1 + settings.max_loss_increase)
    if decision.candidate_loss > limit:
        decision.promoted = False
        decision.reason = (f"holdout loss rose from {decision.in_use_loss:.4f} to {decision.candidate_loss:.4f} "
                           f"(more than promotion.max_loss_increase = {settings.max_loss_increase:g})")
        return decision
    for language in sorted(in_use):
        before, after = in_use[language][0], candidate.get(language, (math.nan, 0))[0]
        if not after <= before * (1 + settings.max_language_loss_increase):
            decision.promoted = False
            decision.reason = (f"{language} holdout loss rose from {before:.4f} to {after:.4f} "
                               f"{_measured_on(in_use[language][1])} (more than promotion.max_language_loss_increase = "
                               f"{settings.max_language_loss_increase:g})")
            return decision
    for language in sorted(best or {}):
        if language in candidate and not candidate[language][0] <= best[language] * (1 + settings.max_drift):
            decision.promoted = False
            decision.reason = (f"{language} holdout loss {candidate[language][0]:.4f} {_measured_on(candidate[language][1])} "
                               f"is more than promotion.max_drift = {settings.max_drift:g} above the best an adapter in "
                               f"service reached ({best[language]:.4f})")
            return decision
    decision.reason = f"holdout loss {decision.in_use_loss:.4f} -> {decision.candidate_loss:.4f}"
    return decision


def _measured_on(tokens: int) -> str:
    """How much holdout a language's verdict rests on: a language first seen with a few rows has a file or two
    in the holdout, where a harmless run can look a few per cent worse; the person reading the reason judges."""
    return f"(on {tokens:,} holdout tokens)"


def _decision(promoted: bool, reason: str, in_use: LanguageLosses | None, candidate: LanguageLosses | None) -> Decision:
    decision = Decision(promoted, reason)
    if in_use:
        decision.in_use_loss = overall_loss(in_use)
        decision.in_use_languages = {language: loss for language, (loss, _) in in_use.items()}
    if candidate:
        decision.candidate_loss = overall_loss(candidate)
        decision.candidate_languages = {language: loss for language, (loss, _) in candidate.items()}
    if decision.in_use_loss is not None and decision.candidate_loss is not None:
        decision.margin = decision.in_use_loss - decision.candidate_loss
    return decision


def holdout_metrics(decision: Decision, anchors: Anchors) -> dict[str, float]:
    """The holdout/* keys: the candidate's losses, the adapter in use's as `*_in_use`, the anchors as `best_*`."""
    key = language_keys([*anchors, *decision.candidate_languages, *decision.in_use_languages])
    metrics: dict[str, float] = {f"holdout/best_{key[language]}": entry[0] for language, entry in anchors.items()}
    for suffix, loss, languages in (("", decision.candidate_loss, decision.candidate_languages),
                                    ("_in_use", decision.in_use_loss, decision.in_use_languages)):
        if loss is None:
            continue
        metrics[f"holdout/loss{suffix}"] = loss
        metrics[f"holdout/perplexity{suffix}"] = math.exp(min(loss, 50.0))
        for language, language_loss in languages.items():
            metrics[f"holdout/loss{suffix}_{key[language]}"] = language_loss
    return metrics
