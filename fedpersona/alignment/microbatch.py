"""Micro-batches sized by a token budget: what one forward/backward may hold, whatever the model.

A batch of pairs is cut, in order, into consecutive chunks whose padded size ``rows x width`` stays within
``max_tokens`` (``max-tokens-per-batch``). Memory of a forward grows with that product (activations) and,
through ``fedpersona.alignment.logprobs``, not with the vocabulary. Training accumulates the chunks'
gradients into one optimizer step (``batch-size`` pairs), DP-SGD uses the chunks as its physical batches;
reference log-probs and evaluation use them as inference batches.
"""

from __future__ import annotations

from collections.abc import Sequence


def pair_width(pair) -> int:
    """Tokens of the longer side of an ``EncodedPair`` (its padded width in a batch)."""
    return max(len(pair.chosen[0]), len(pair.rejected[0]))


def token_chunks(widths: Sequence[int], max_tokens: int, *, rows_per_item: int = 2,
                 max_items: int | None = None) -> list[list[int]]:
    """Positions ``0..len(widths)-1`` split in order into chunks with
    ``rows_per_item * len(chunk) * max(width in chunk) <= max_tokens`` (and at most ``max_items`` items).

    An item alone over the budget gets a chunk of its own (it cannot be split). ``rows_per_item`` is 2
    when both sides of a pair go through one forward, 1 when each side has its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    chunks: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, w in enumerate(widths):
        grown = max(width, w)
        full = max_items is not None and len(current) >= max_items
        if current and (full or rows_per_item * (len(current) + 1) * grown > max_tokens):
            chunks.append(current)
            current, grown = [], w
        current.append(i)
        width = grown
    if current:
        chunks.append(current)
    return chunks


def pair_chunks(pairs: Sequence, max_tokens: int, *, rows_per_item: int = 2,
                max_items: int | None = None) -> list[list[int]]:
    """``token_chunks`` over encoded pairs (positions into ``pairs``)."""
    return token_chunks([pair_width(p) for p in pairs], max_tokens, rows_per_item=rows_per_item,
                        max_items=max_items)
