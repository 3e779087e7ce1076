"""Packing: samples' tokens side by side in blocks of at most `max_length`, positions restarting per sample.

Position ids restart at 0 for each sample; with no attention mask, transformers turns restarting position
ids into a block-diagonal mask (FlashAttention-2 varlen, SDPA and eager alike), so samples in one block never
attend to each other. The first token of each sample carries no label, so nothing is trained to predict
across a boundary.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    """One sample's tokens (int32) and which of them carry loss: None when all do (raw format), else a
    bool mask that is False on a completion's prompt."""

    sample_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray | None = None

    @classmethod
    def of(cls, sample_id: int, input_ids: list[int], prompt_length: int = 0) -> TokenizedSample:
        mask = None
        if prompt_length:
            mask = np.ones(len(input_ids), dtype=bool)
            mask[:prompt_length] = False
        return cls(sample_id, np.asarray(input_ids, dtype=np.int32), mask)


class Block:
    """One packed row: several samples' tokens side by side, positions restarting per sample.

    Stored compactly (int32 ids, plus a bool loss mask only when some tokens carry no loss: 4-5 bytes a
    token), so 100,000 samples of code take a few hundred MB; labels and position ids are derived when a
    batch is built.
    """

    def __init__(self) -> None:
        self._pieces: list[TokenizedSample] = []
        self._length = 0
        self._input_ids: np.ndarray | None = None
        self._loss_mask: np.ndarray | None = None
        self.lengths = np.zeros(0, dtype=np.int32)

    def add(self, sample: TokenizedSample) -> None:
        self._pieces.append(sample)
        self._length += len(sample.input_ids)
        self._input_ids = None

    def _assembled(self) -> None:
        if self._input_ids is None:
            self._input_ids = np.concatenate([piece.input_ids for piece in self._pieces]) if self._pieces else np.zeros(0, np.int32)
            if any(piece.loss_mask is not None for piece in self._pieces):
                self._loss_mask = np.concatenate([
                    piece.loss_mask if piece.loss_mask is not None else np.ones(len(piece.input_ids), dtype=bool)
                    for piece in self._pieces
                ])
            self.lengths = np.fromiter((len(piece.input_ids) for piece in self._pieces), dtype=np.int32)

    def seal(self) -> Block:
        """Assemble the arrays and drop the per-sample pieces (no more adds after this)."""
        self._assembled()
        self._pieces = []
        return self

    def __len__(self) -> int:
        return self._length

    @property
    def input_ids(self) -> np.ndarray:
        self._assembled()
        return self._input_ids

    @property
    def position_ids(self) -> np.ndarray:
        self._assembled()
        starts = np.cumsum(self.lengths) - self.lengths
        return np.arange(self._length, dtype=np.int64) - np.repeat(starts, self.lengths)

    @property
    def labels(self) -> np.ndarray:
        """Token ids where loss is taken, IGNORE_INDEX elsewhere. The first token of each sample is ignored:
        it would be predicted from the end of the previous sample."""
        self._assembled()
        if self._loss_mask is None:
            labels = self._input_ids.astype(np.int64)
        else:
            labels = np.where(self._loss_mask, self._input_ids, IGNORE_INDEX).astype(np.int64)
        labels[np.cumsum(self.lengths) - self.lengths] = IGNORE_INDEX
        return labels


def one_sample_per_block(blocks: list[Block]) -> list[Block]:
    """Undo packing: each sample piece in a row of its own (for backends that cannot isolate packed samples)."""
    single = []
    for block in blocks:
        offset = 0
        for length in block.lengths.tolist():
            mask = None if block._loss_mask is None else block._loss_mask[offset : offset + length]
            piece = Block()
            piece.add(TokenizedSample(-1, block.input_ids[offset : offset + length], mask))
            single.append(piece.seal())
            offset += length
    return single


class Packer:
    """Online best fit: each sequence goes into the open block with the least room that still holds it.

    A block with less than `seal_below` tokens of room left is sealed (its pieces assembled into arrays
    and released), and at most `max_open` blocks stay open, so memory holds the packed arrays plus a
    bounded working set, whatever the number of samples.
    """

    def __init__(self, max_length: int, seal_below: int | None = None, max_open: int = 4096):
        self.max_length = max_length
        self.seal_below = seal_below if seal_below is not None else max(2, max_length // 64)
        self.max_open = max_open
        self.blocks: list[Block] = []
        # Sorted (free space, block index) of the open blocks; bisect finds the tightest fit.
        self._free_space: list[tuple[int, int]] = []

    def add(self, sequence: TokenizedSample) -> None:
        length = len(sequence.input_ids)
        position = bisect.bisect_left(self._free_space, (length, -1))
        if position < len(self._free_space):
            space, index = self._free_space.pop(position)
        else:
            self.blocks.append(Block())
            space, index = self.max_length, len(self.blocks) - 1
        self.blocks[index].add(sequence)
        if space - length < self.seal_below:
            self.blocks[index].seal()
        else:
            bisect.insort(self._free_space, (space - length, index))
        if len(self._free_space) > self.max_open:
            _, fullest = self._free_space.pop(0)
            self.blocks[fullest].seal()

    def finish(self) -> list[Block]:
        return [block.seal() for block in self.blocks]


def pack_best_fit(sequences: list[TokenizedSample], max_length: int) -> list[Block]:
    """Best-fit decreasing over a list already in memory: longest first."""
    packer = Packer(max_length)
    for sequence in sorted(sequences, key=lambda item: len(item.input_ids), reverse=True):
        packer.add(sequence)
    return packer.finish()
