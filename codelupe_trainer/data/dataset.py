"""From samples to train-ready packed blocks: filter, format, tokenize once, pack, split. No I/O.

Samples stream through in chunks so memory depends on the run's size, not on the table. Each sample is
tokenized exactly once, in batches, and its token count is reused for the dataset statistics.

Packing (`packing.py`) puts several samples into one block of at most `max_length` tokens.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

import numpy as np


from ..errors import TrainingError
from .codestats import CodeTotals, measure_code
from .languages import language_keys
from .packing import Block, Packer, TokenizedSample
from .records import Blocker, FetchResult, Sample

TOKENIZE_CHUNK = 1000

# A formatter turns a sample into (prompt, completion); only the completion's tokens carry loss. The prompt is
# a tuple of pieces that alternate between markup (even positions: the chat template's own text, whose
# special tokens such as <|im_start|> are meant) and code (odd positions). Code, in the prompt and in the
# completion, is tokenized as plain text: a file that holds the text "<|endoftext|>" or "<|fim_prefix|>"
# (tokenizer code, model servers, this project) must not teach the model to emit those control tokens.
Formatter = Callable[[Sample], "tuple[tuple[str, ...], str]"]


class Tokenizer(Protocol):
    eos_token_id: int

    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


@dataclass
class BuiltDataset:
    train_blocks: list[Block]
    eval_blocks: list[Block]
    sample_ids: list[int]
    train_samples: int
    eval_samples: int
    data_metrics: dict[str, float]
    dataset_metrics: dict[str, float]
    # Older samples mixed into train_blocks against forgetting (not in sample_ids, never counted as new).
    replay_samples: int = 0

    @property
    def total_samples(self) -> int:
        return len(self.sample_ids)


def format_raw(sample: Sample) -> tuple[tuple[str, ...], str]:
    """Plain causal-LM text: a language tag line, then the code (EOS is appended as a token id); all of it trains."""
    return (), f"<|lang:{sample.language}|>\n{sample.content}"


def completion_split_line(sample: Sample, line_count: int) -> int:
    """A line boundary between 30 % and 70 % of the file, fixed per sample id so reruns agree."""
    fraction = 0.3 + 0.4 * (int.from_bytes(hashlib.blake2b(str(sample.id).encode(), digest_size=4).digest(), "little") / 2**32)
    return max(1, min(line_count - 1, round(line_count * fraction)))


# Stands in for the user message while the chat template is rendered once: what comes before and after it
# is the template's markup. A private-use character no template touches.
_MESSAGE_SLOT = "\ue000codelupe-message\ue000"


def make_completion_formatter(tokenizer) -> Formatter:
    """Prompt: the start of the file as a user message in the tokenizer's chat template; completion: the rest."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError("data.format = 'completion' needs the model's chat template, and this model's tokenizer "
                            "has none (a base model): use data.format = 'raw', or an instruct model")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MESSAGE_SLOT}], tokenize=False,
                                             add_generation_prompt=True)
    before, slot, after = rendered.partition(_MESSAGE_SLOT)
    if not slot:
        raise TrainingError("data.format = 'completion': the model's chat template does not show the user message "
                            "as written, so the prompt cannot be told from the code; use data.format = 'raw'")

    def format_completion(sample: Sample) -> tuple[tuple[str, ...], str]:
        lines = sample.content.splitlines(keepends=True)
        if len(lines) < 2:
            return format_raw(sample)
        split = completion_split_line(sample, len(lines))
        head, tail = "".join(lines[:split]), "".join(lines[split:])
        return (before, f"Continue this {sample.language} code:\n{head}", after), tail

    return format_completion


def is_eval_sample(sample_id: int, seed: int, eval_fraction: float) -> bool:
    """A stable per-id coin flip, so a sample never changes split between runs."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


def within_block_budget(samples: Iterable[Sample], budget: int | None, tokenizer: Tokenizer, max_length: int,
                        format_text: Formatter, eval_fraction: float, seed: int, fetched: FetchResult,
                        max_eval_samples: int | None = None) -> Iterator[Sample]:
    """Pass samples on while the training blocks they make fit `budget` (None: no budget, nothing is done).

    A step budget (training.max_steps) trains only so many blocks, and a row may be recorded as trained only
    if training saw it, so a cycle must take no more rows than the budget trains. A shadow of the training
    packer, fed the same pieces in the same order, counts the blocks exactly; the first sample that would
    overflow ends the stream and `fetched` leaves it and every later row for the next run. (This tokenizes
    the samples a second time, only when a step budget is set.)
    """
    if budget is None:
        yield from samples
        return
    shadow = Packer(max_length)
    taken = evaluated = 0
    for sample in samples:
        # The same eval cap as build_dataset's; this count includes samples a filter will block, so it
        # reaches the cap no later than the build's: the shadow never counts fewer training blocks.
        if is_eval_sample(sample.id, seed, eval_fraction) and (max_eval_samples is None or evaluated < max_eval_samples):
            evaluated += 1
        else:
            for piece in tokenize_samples([sample], tokenizer, max_length, format_text):
                shadow.add(TokenizedSample(piece.sample_id, np.empty(len(piece.input_ids), dtype=np.int8)))
            # The first sample is always taken (even one larger than the budget), so every cycle makes progress.
            if len(shadow.blocks) > budget and taken:
                fetched.stop_before(sample.id)
                return
            taken += 1
        yield sample


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def tokenize_samples(
    samples: list[Sample], tokenizer: Tokenizer, max_length: int, format_text: Formatter = format_raw
) -> list[TokenizedSample]:
    """Batched tokenizer calls per chunk; samples longer than max_length are split into pieces."""
    pairs = [format_text(sample) for sample in samples]
    completions = _encode(tokenizer, [completion for _, completion in pairs], markup=False)
    prompts = _encode_prompts(tokenizer, [prompt for prompt, _ in pairs])
    eos = tokenizer.eos_token_id
    tokenized = []
    for sample, prompt_ids, completion_ids in zip(samples, prompts, completions):
        whole = TokenizedSample.of(sample.id, [*prompt_ids, *completion_ids, eos], prompt_length=len(prompt_ids))
        for start in range(0, len(whole.input_ids), max_length):
            if len(whole.input_ids) - start > 1:
                mask = None if whole.loss_mask is None else whole.loss_mask[start : start + max_length]
                tokenized.append(TokenizedSample(sample.id, whole.input_ids[start : start + max_length], mask))
    return tokenized


def _encode_prompts(tokenizer: Tokenizer, prompts: list[tuple[str, ...]]) -> list[list[int]]:
    """Each prompt's ids: its markup pieces with their special tokens, its code pieces as plain text."""
    if not any(prompts):
        return [[] for _ in prompts]
    markup = sorted({piece for prompt in prompts for piece in prompt[0::2]})  # the same few pieces every sample
    markup_ids = dict(zip(markup, _encode(tokenizer, markup, markup=True)))
    code = iter(_encode(tokenizer, [piece for prompt in prompts for piece in prompt[1::2]], markup=False))
    return [[token for position, piece in enumerate(prompt)
             for token in (markup_ids[piece] if position % 2 == 0 else next(code))] for prompt in prompts]


# Per tokenizer, two copies of its Rust backend: one reads special-token text as the special token (markup),
# one as plain text (code). Copies, not the backend's own flag flipped around each call: two threads
# tokenize at once (the build's worker and the step budget's shadow), and the transformers call leaves the
# flag as its last caller set it.
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode(tokenizer: Tokenizer, texts: list[str], markup: bool) -> list[list[int]]:
    """Token ids of each text; `markup` False reads special-token text as plain text (code, never control)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and hasattr(backend, "encode_special_tokens"):
        if tokenizer not in _BACKENDS:
            copies = type(backend).from_str(backend.to_str()), type(backend).from_str(backend.to_str())
            copies[0].encode_special_tokens, copies[1].encode_special_tokens = False, True
            _BACKENDS[tokenizer] = copies
        backend = _BACKENDS[tokenizer][0 if markup else 1]
        # The Rust tokenizer directly, without computing character offsets we never use: about 20 % faster
        # than the transformers call, same ids.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                     split_special_tokens=not markup)["input_ids"]


@dataclass
class TokenStats:
    """Tokens per sample (all pieces of a sample together), as running figures."""

    samples: int = 0
    total: int = 0
    largest: int = 0
    smallest: int = 0

    def add(self, count: int) -> None:
        self.smallest = count if self.samples == 0 else min(self.smallest, count)
        self.largest = max(self.largest, count)
        self.samples += 1
        self.total += count


def build_dataset(
    samples: Iterable[Sample],
    tokenizer: Tokenizer,
    max_length: int,
    eval_fraction: float,
    seed: int,
    blockers: list[tuple[str, Blocker]] = (),
    skipped_upstream: Counter | None = None,
    format_text: Formatter = format_raw,
    max_eval_samples: int | None = None,
) -> BuiltDataset:
    """Run every sample through the blockers, tokenize the survivors once, split by id and pack.

    The tokenizer (Rust, releases the GIL) works on one chunk in a worker thread while this thread reads
    and filters the next one, so fetching, filtering and tokenizing overlap.
    `skipped_upstream` is read at the end: the source fills it while the stream is consumed.
    """
    train_packer, eval_packer = Packer(max_length), Packer(max_length)
    eval_ids: set[int] = set()
    token_stats = TokenStats()
    tally = _Tally()

    def collect(tokenized_chunk: list[TokenizedSample]) -> None:
        # The pieces of one sample are adjacent: sum them before counting the sample.
        current_id, current_tokens = None, 0
        for tokenized in tokenized_chunk:
            if tokenized.sample_id != current_id:
                if current_id is not None:
                    token_stats.add(current_tokens)
                current_id, current_tokens = tokenized.sample_id, 0
            current_tokens += len(tokenized.input_ids)
            # Past data.max_eval_samples the evaluation split is full and the rest of its share trains.
            if tokenized.sample_id in eval_ids or (is_eval_sample(tokenized.sample_id, seed, eval_fraction) and (
                    max_eval_samples is None or len(eval_ids) < max_eval_samples)):
                eval_ids.add(tokenized.sample_id)
                eval_packer.add(tokenized)
            else:
                train_packer.add(tokenized)
        if current_id is not None:
            token_stats.add(current_tokens)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as tokenizer_thread:
        in_flight: Future | None = None
        for chunk in chunked(samples, TOKENIZE_CHUNK):
            passed = [sample for sample in chunk if tally.admit(sample, blockers)]
            if in_flight is not None:
                collect(in_flight.result())
                in_flight = None
            if passed:
                in_flight = tokenizer_thread.submit(tokenize_samples, passed, tokenizer, max_length, format_text)
        if in_flight is not None:
            collect(in_flight.result())

    train_blocks, eval_blocks = train_packer.finish(), eval_packer.finish()
    passed_count = len(tally.sample_ids)
    data_metrics = summarize_data(
        seen=tally.seen, passed=passed_count, languages=tally.languages, quality_sum=tally.quality_sum,
        chars_sum=tally.chars_sum, blocked=tally.blocked, skipped=Counter(skipped_upstream or {}),
        blocked_by_language=tally.blocked_by_language,
    ) | tally.code.summary()
    dataset_metrics = summarize_dataset(
        train_samples=passed_count - len(eval_ids), eval_samples=len(eval_ids), token_stats=token_stats,
        blocks=train_blocks + eval_blocks, max_length=max_length,
    )
    return BuiltDataset(
        train_blocks=train_blocks,
        eval_blocks=eval_blocks,
        sample_ids=tally.sample_ids,
        train_samples=passed_count - len(eval_ids),
        eval_samples=len(eval_ids),
        data_metrics=data_metrics,
        dataset_metrics=dataset_metrics,
    )


@dataclass
class _Tally:
    """Running counts over the samples as they stream past."""

    seen: int = 0
    quality_sum: int = 0
    chars_sum: int = 0
    sample_ids: list[int] = field(default_factory=list)
    blocked: Counter = field(default_factory=Counter)
    blocked_by_language: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    code: CodeTotals = field(default_factory=CodeTotals)

    def admit(self, sample: Sample, blockers: Iterable[tuple[str, Blocker]]) -> bool:
        self.seen += 1
        reason = _first_block_reason(sample, blockers)
        if reason is not None:
            self.blocked[reason] += 1
            self.blocked_by_language[reason, sample.language] += 1
            return False
        self.sample_ids.append(sample.id)
        self.languages[sample.language] += 1
        self.quality_sum += sample.quality
        self.chars_sum += len(sample.content)
        self.code.add(measure_code(sample.content, sample.language))
        return True


def _first_block_reason(sample: Sample, blockers: Iterable[tuple[str, Blocker]]) -> str | None:
    for name, blocker in blockers:
        if blocker(sample):
            return name
    return None


BLOCK_FILTERS = ("secrets", "license", "malicious", "duplicates", "near_duplicates")


def summarize_data(
    seen: int, passed: int, languages: Counter, quality_sum: int, chars_sum: int, blocked: Counter, skipped: Counter,
    blocked_by_language: Counter | None = None,
) -> dict[str, float]:
    """The data/* group: what came in, what passed, what each filter blocked (in all and per language)
    and why rows were skipped."""
    blocked_by_language = blocked_by_language or Counter()
    examined = seen + sum(skipped.values())
    metrics: dict[str, float] = {
        "data/total_samples": passed,
        "data/rows_examined": examined,
        "data/avg_quality_score": quality_sum / passed if passed else 0.0,
        "data/avg_code_length": chars_sum / passed if passed else 0.0,
        "data/pass_rate": 100.0 * passed / examined if examined else 0.0,
    }
    key = language_keys(set(languages) | {language for _, language in blocked_by_language})
    for language, count in sorted(languages.items()):
        metrics[f"data/language_{key[language]}"] = count
        metrics[f"data/language_{key[language]}_percent"] = 100.0 * count / passed
    blocked_per_language: Counter = Counter()
    for (name, language), count in sorted(blocked_by_language.items()):
        metrics[f"data/blocked_{name}_{key[language]}"] = count
        blocked_per_language[language] += count
    for language in sorted(set(languages) | set(blocked_per_language)):
        reached = languages.get(language, 0) + blocked_per_language[language]
        metrics[f"data/language_{key[language]}_pass_rate"] = 100.0 * languages.get(language, 0) / reached
    for name in BLOCK_FILTERS:
        metrics[f"data/blocked_{name}"] = blocked.get(name, 0)
    metrics["data/blocked_total"] = sum(blocked.values())
    for reason, count in sorted(skipped.items()):
        metrics[f"data/skipped_{reason}"] = count
    metrics["data/skipped_total"] = sum(skipped.values())
    return metrics


def summarize_dataset(
    train_samples: int, eval_samples: int, token_stats: TokenStats, blocks: list[Block], max_length: int
) -> dict[str, float]:
    total = train_samples + eval_samples
    real_tokens = sum(len(block) for block in blocks)
    return {
        "dataset/train_size": train_samples,
        "dataset/eval_size": eval_samples,
        "dataset/total_size": total,
        "dataset/train_eval_ratio": train_samples / eval_samples if eval_samples else float(train_samples),
        "dataset/avg_tokens_per_sample": token_stats.total / token_stats.samples if token_stats.samples else 0.0,
        "dataset/max_tokens": token_stats.largest,
        "dataset/min_tokens": token_stats.smallest,
        "dataset/total_tokens": real_tokens,
        "dataset/packed_blocks": len(blocks),
        "dataset/real_token_fraction": real_tokens / (len(blocks) * max_length) if blocks else 0.0,
    }


# ------------------------------------------------------------------ holdout and replay blocks


def pack_samples(samples: list[Sample], tokenizer: Tokenizer, max_length: int, format_text: Formatter = format_raw) -> list[Block]:
    """Tokenize and pack a small, already-filtered list of samples (the holdout, the replay draw)."""
    packer = Packer(max_length)
    for chunk in chunked(samples, TOKENIZE_CHUNK):
        for piece in tokenize_samples(chunk, tokenizer, max_length, format_text):
            packer.add(piece)
    return packer.finish()


def pack_by_language(samples: list[Sample], tokenizer: Tokenizer, max_length: int,
                     format_text: Formatter = format_raw) -> dict[str, list[Block]]:
    """One set of blocks per language, so each block's loss belongs to one language."""
    by_language: dict[str, list[Sample]] = {}
    for sample in samples:
        by_language.setdefault(sample.language, []).append(sample)
    return {language: pack_samples(group, tokenizer, max_length, format_text)
            for language, group in sorted(by_language.items())}


def admitted(samples: Iterable[Sample], blockers: Iterable[tuple[str, Blocker]]) -> list[Sample]:
    """The samples no blocker stops (for replay: the content filters only, not the duplicate stores)."""
    blockers = list(blockers)
    return [sample for sample in samples if _first_block_reason(sample, blockers) is None]
