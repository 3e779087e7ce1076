"""Batches for the Trainer: packed blocks padded to the longest in the batch, with restarting position ids."""

from __future__ import annotations

import numpy as np
import torch

from .packing import IGNORE_INDEX, Block


class PackedCollator:
    """Pads packed blocks to the longest in the batch and counts what it collated.

    Padding gets its own restarting position ids and no labels, so it is a separate, loss-free segment.
    No attention mask is built: restarting position ids are what keep packed samples apart.
    The counts (samples and real tokens) are read by the step timer, avoiding any device sync.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.samples_collated = 0
        self.tokens_collated = 0

    def __call__(self, blocks: list[Block]) -> dict[str, torch.Tensor]:
        longest = max(len(block) for block in blocks)
        input_ids = np.full((len(blocks), longest), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(blocks), longest), IGNORE_INDEX, dtype=np.int64)
        # Padding continues as its own sequence (0, 1, 2, ...), so the mask keeps it apart too.
        position_ids = np.tile(np.arange(longest, dtype=np.int64), (len(blocks), 1))
        for row, block in enumerate(blocks):
            length = len(block)
            input_ids[row, :length] = block.input_ids
            labels[row, :length] = block.labels
            position_ids[row, :length] = block.position_ids
            position_ids[row, length:] -= length
            self.tokens_collated += length
            self.samples_collated += len(block.lengths)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
