"""What keeps a continuously trained adapter honest, as the cycle assembles it: the fixed holdout every run is
evaluated on (frozen on the first run, stratified by language, kept by id, never trained) and the replay of
older rows mixed into each run against forgetting (README: "The promotion gate")."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterator

from .config import Settings
from .data.dataset import BuiltDataset, admitted, is_eval_sample, pack_samples
from .data.holdout import holdout_store
from .data.packing import Block
from .data.records import Sample
from .data.source import fetch_replay_samples, fetch_samples_by_id, select_holdout
from .state import TrainerState

log = logging.getLogger(__name__)


class Holdout:
    """The fixed holdout as this run sees it: its ids, its rows re-read from PostgreSQL, their blocks per
    language, and how many of this run's new rows belong to it (consumed, never trained)."""

    def __init__(self, ids: set[int], samples: list[Sample]):
        self.ids = ids
        self.samples = samples
        self.blocks: dict[str, list[Block]] = {}
        self.rows_in_fetch = 0


def load_holdout(connection, settings: Settings, state: TrainerState) -> Holdout:
    """Freeze the holdout on the first run (stratified by language); add a language it lacks when one first
    appears, or again when all its rows are gone; top up a language it holds fewer than
    holdout_min_per_language rows of (one that joined with a handful); refill it when fewer than half its rows are left (rows
    deleted from the table), so the gate never runs out of rows to judge on; re-read its rows. Added ids come
    from the rows this run is about to read (never trained) and are committed before anything trains."""
    promotion = settings.promotion
    if promotion.holdout_samples == 0:
        return Holdout(set(), [])
    store = holdout_store(settings.paths.state_file.parent)
    try:
        ids = store.ids()
        samples = fetch_samples_by_id(connection, settings.database, settings.data, ids)
        if len(samples) < len(ids):
            log.warning("holdout: %d of its %d rows are gone from the table or no longer eligible",
                        len(ids) - len(samples), len(ids))
        # Half its rows gone: the per-run comparison would rest on a handful of samples, and on none once the
        # last one goes ("promoted unchecked" forever). Refill to holdout_samples like the first run did; the
        # anchors restart, since their fingerprints include the ids.
        refill = bool(ids) and len(samples) < min(len(ids), promotion.holdout_samples) / 2
        held = {} if refill else Counter(sample.language for sample in samples)
        size = promotion.holdout_samples - len(samples) if refill or not ids else 0
        added = select_holdout(connection, settings.database, settings.data, state.last_trained_id,
                               settings.data.max_samples_per_run, held, size=size,
                               min_per_language=promotion.holdout_min_per_language)
        known = set(ids)
        added = [(row_id, language) for row_id, language in added if row_id not in known]
        if added:
            store.add(added, state.total_training_runs + 1)
            log.info("holdout: %d samples %s (%s)", len(added),
                     "added to refill it: fewer than half of its rows were left" if refill else "added",
                     ", ".join(sorted({language for _, language in added})))
            samples += fetch_samples_by_id(connection, settings.database, settings.data,
                                           [row_id for row_id, _ in added])
            ids = store.ids()
    finally:
        store.close()
    return Holdout(set(ids), sorted(samples, key=lambda sample: sample.id))


def holdout_fingerprints(holdout: Holdout, settings: Settings) -> dict[str, str]:
    """Per language, what its holdout loss is measured on: the rows read today, the base model, the length
    they are cut to and the format (the completion format puts no loss on the prompt, so its losses are on
    other tokens). Losses with different fingerprints are not comparable (promotion.py's anchors)."""
    ids: dict[str, list[int]] = {}
    for sample in holdout.samples:
        ids.setdefault(sample.language, []).append(sample.id)
    # "raw" adds nothing: anchors recorded before the format counted stay comparable after an upgrade.
    text_format = "" if settings.data.format == "raw" else f"|{settings.data.format}"
    return {language: hashlib.sha256(f"{settings.model.base_model}|{settings.data.max_length}|"
                                     f"{sorted(language_ids)}{text_format}".encode()).hexdigest()[:16]
            for language, language_ids in ids.items()}


def without_holdout(samples: Iterator[Sample], holdout: Holdout) -> Iterator[Sample]:
    for sample in samples:
        if sample.id in holdout.ids:
            holdout.rows_in_fetch += 1
            continue
        yield sample


def add_replay(connection, settings: Settings, state: TrainerState, dataset: BuiltDataset, holdout: Holdout,
               blockers, tokenizer, format_text) -> None:
    """Mix older, already-trained samples into the training blocks, against forgetting: re-read by id,
    through the content filters again (not the duplicate stores: they are known by definition), never from
    the evaluation split, the holdout or a pending gap. Within a step budget they only fill what the new rows
    leave free, so a new row is never pushed out of training by replay."""
    wanted = math.ceil(settings.promotion.replay_fraction * dataset.train_samples)
    if wanted == 0 or state.last_trained_id == 0:
        return
    gaps = state.gap_ranges()
    drawn = fetch_replay_samples(connection, settings.database, settings.data, state.last_trained_id, wanted,
                                 sorted(holdout.ids), salt=state.total_training_runs + 1)
    usable = [sample for sample in drawn
              if not is_eval_sample(sample.id, settings.data.seed, settings.data.eval_fraction)
              and not any(first <= sample.id <= last for first, last in gaps)]
    content_filters = [(name, blocker) for name, blocker in blockers if name not in ("duplicates", "near_duplicates")]
    replay = admitted(usable, content_filters)
    packed = pack_samples(replay, tokenizer, settings.data.max_length, format_text)
    budget = settings.training.block_budget
    blocks = packed if budget is None else packed[: max(0, budget - len(dataset.train_blocks))]
    # Cut by a step budget: count the sample pieces that made it (a long sample may be split in two).
    replayed = len(replay) if len(blocks) == len(packed) else int(sum(len(block.lengths) for block in blocks))
    dataset.train_blocks.extend(blocks)
    dataset.replay_samples = replayed
    dataset.data_metrics["data/replay_samples"] = replayed
    dataset.dataset_metrics["dataset/replay_blocks"] = len(blocks)
