"""Batches for the Trainer: packed blocks padded to the longest in the batch, with restarting position ids."""

from __future__ import annotations

import numpy as np
import torch

from .packing import IGNORE_INDEX, Block


# Keys a counting collator adds to each batch: plain ints, taken out before the model sees the batch.
SAMPLES_KEY = "codelupe_samples"
TOKENS_KEY = "codelupe_tokens"
COUNT_KEYS = (SAMPLES_KEY, TOKENS_KEY)


class PackedCollator:
    """Pads packed blocks to the longest in the batch.

    Padding gets its own restarting position ids and no labels, so it is a separate, loss-free segment.
    No attention mask is built: restarting position ids are what keep packed samples apart.
    With `with_counts`, each batch carries its own sample and real-token counts (host ints, so reading them
    needs no device sync), and the training step that consumes the batch is the one that counts it: eval
    batches, prefetched batches and batches of an interrupted step are never counted as trained.
    """

    def __init__(self, pad_token_id: int, with_counts: bool = False):
        self.pad_token_id = pad_token_id
        self.with_counts = with_counts

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
        batch: dict = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
        }
        if self.with_counts:
            batch[SAMPLES_KEY] = sum(len(block.lengths) for block in blocks)
            batch[TOKENS_KEY] = sum(len(block) for block in blocks)
        return batch
