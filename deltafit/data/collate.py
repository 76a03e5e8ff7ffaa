"""Collation: examples (or packed rows) -> padded tensor batches, and the real tokens in a batch."""

from __future__ import annotations

from typing import Optional

from deltafit.data.formats import IGNORE_INDEX


def make_collator(pad_token_id: Optional[int], task: str) -> "Collator":
    """Batch examples (or packed rows) with dynamic right-padding to the longest one in the batch."""
    return Collator(pad_token_id, task)


class Collator:
    """A class rather than a closure so DataLoader workers can pickle it."""

    def __init__(self, pad_token_id: Optional[int], task: str):
        # Padded positions are hidden by the attention mask and ignored by the loss, so any id
        # works when the tokenizer has no pad token.
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.classification = task == "seq-cls"

    def __call__(self, batch: list[dict]) -> dict:
        if "position_ids" in batch[0]:
            return self._packed(batch)
        import torch

        width = max(len(ex["input_ids"]) for ex in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, ex in enumerate(batch):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = torch.tensor(ex["attention_mask"], dtype=torch.long)
            if not self.classification:
                labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        if self.classification:
            labels = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _packed(self, batch: list[dict]) -> dict:
        """Packed rows: position_ids and no attention mask (transformers then keeps examples apart).
        Padding gets position 0 at every slot, so each padding token is a one-token sequence of its
        own; real examples are never shorter than 2 tokens, which `batch_tokens` relies on."""
        import torch

        width = max(len(row["input_ids"]) for row in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
            position_ids[i, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a collated batch, packed or not."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    # Packed: padding is the run of position 0s at the end of a row (see Collator._packed).
    positions = batch["position_ids"]
    trailing_zeros = (positions.flip(-1) != 0).int().argmax(-1)
    return int(positions.shape[1] * positions.shape[0] - trailing_zeros.sum())
