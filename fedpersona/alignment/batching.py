"""Pairs -> padded token tensors, with a mask over the response tokens that are scored."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpersona.alignment.logprobs import sequence_logprobs  # noqa: F401  (re-exported: the one log-prob path)
from fedpersona.data.schema import PreferencePair
from fedpersona.model.prompting import PromptFormat


@dataclass(frozen=True)
class EncodedPair:
    key: bytes  # the reference-cache key: a digest of both encoded sides (format and truncation included)
    chosen: tuple[list[int], int]  # (ids, prompt length)
    rejected: tuple[list[int], int]


def _key(chosen: tuple[list[int], int], rejected: tuple[list[int], int]) -> bytes:
    return hashlib.blake2b(repr((chosen, rejected)).encode(), digest_size=16).digest()


@dataclass
class SideBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    score_mask: torch.Tensor  # [B, T-1]: 1 where token t+1 is a response token (scored)


def encode_pairs(prompt_format: PromptFormat, pairs: Sequence[PreferencePair], max_length: int) -> list[EncodedPair]:
    """Both sides of each pair through the one formatting function (``resident.prompt_format``)."""
    if not isinstance(prompt_format, PromptFormat):
        raise TypeError("encode_pairs takes a PromptFormat (resident.prompt_format), not a tokenizer")
    encoded = []
    for p in pairs:
        prompt_ids = prompt_format.prompt_ids(p.prompt, max_tokens=max_length)  # rendered once: both sides share it
        chosen = prompt_format.encode(p.prompt, p.chosen, max_length, prompt_ids)
        rejected = prompt_format.encode(p.prompt, p.rejected, max_length, prompt_ids)
        encoded.append(EncodedPair(_key(chosen, rejected), chosen, rejected))
    return encoded


def collate(sides: Sequence[tuple[list[int], int]], pad_id: int, device: str = "cpu") -> SideBatch:
    width = max(len(ids) for ids, _ in sides)
    input_ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sides), width), dtype=torch.long)
    score = torch.zeros((len(sides), width - 1), dtype=torch.float32)
    for row, (ids, prompt_len) in enumerate(sides):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        score[row, prompt_len - 1 : len(ids) - 1] = 1.0
    return SideBatch(input_ids.to(device), attention.to(device), score.to(device))
