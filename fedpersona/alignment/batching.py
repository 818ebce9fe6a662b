"""Pairs -> padded token tensors, with a mask over the response tokens that are scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpersona.data.schema import PreferencePair
from fedpersona.model.prompting import encode_pair_side


@dataclass(frozen=True)
class EncodedPair:
    key: tuple[str, str, str]  # (prompt, chosen, rejected): the reference-cache key
    chosen: tuple[list[int], int]  # (ids, prompt length)
    rejected: tuple[list[int], int]


@dataclass
class SideBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    score_mask: torch.Tensor  # [B, T-1]: 1 where token t+1 is a response token (scored)


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> list[EncodedPair]:
    return [
        EncodedPair(
            (p.prompt, p.chosen, p.rejected),
            encode_pair_side(tokenizer, p.prompt, p.chosen, max_length),
            encode_pair_side(tokenizer, p.prompt, p.rejected, max_length),
        )
        for p in pairs
    ]


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


def sequence_logprobs(model: torch.nn.Module, batch: SideBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's response tokens, and how many tokens were scored."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * batch.score_mask).sum(-1), batch.score_mask.sum(-1)
