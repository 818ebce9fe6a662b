"""Per-user held-out pairwise preference accuracy for the base, global and personalized models.

* personalized: base + shared + this user's private tensors; a pair counts as right when the DPO
  implicit reward ``log pi(y|x) - log pi_ref(y|x)`` ranks chosen above rejected (a tie counts half).
* global: the same with every private tensor at its initial value (base + shared only).
* base: no adapters. Its implicit reward is zero by definition, so the base ranks by its own mean
  per-token log-likelihood instead: the natural "no alignment" baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpersona.alignment.batching import EncodedPair, encode_pairs
from fedpersona.alignment.trainer import inference_chunks, pair_policy_logps, reference_logps
from fedpersona.data.schema import PreferencePair
from fedpersona.model.resident import ResidentModel


def _ranking_accuracy(margin: torch.Tensor) -> float:
    if margin.numel() == 0:
        return float("nan")
    # counted in integers, divided in float64: 17/24 is 0.7083333333333334, not float32's 0.7083333134651184
    return (int((margin > 0).sum()) + 0.5 * int((margin == 0).sum())) / margin.numel()


@torch.no_grad()
def _policy_margins(resident: ResidentModel, encoded: Sequence[EncodedPair], ref: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    margins, start = [], 0
    for chunk in inference_chunks(resident, encoded, batch_size):
        pc, pr, _, _ = pair_policy_logps(resident, chunk)
        r = ref[start : start + len(chunk)]
        margins.append((pc - r[:, 0]) - (pr - r[:, 1]))
        start += len(chunk)
    return torch.cat(margins) if margins else torch.zeros(0)


def base_margins(encoded: Sequence[EncodedPair], ref: torch.Tensor) -> torch.Tensor:
    """Mean per-token log-likelihood margin (chosen minus rejected) under the frozen base.

    The base's log-probs are the reference log-probs ``ref`` (``[N, 2]``, frozen base, cached): no forward
    of its own; the lengths are the scored (response) tokens of each side."""
    def scored(side: tuple[list[int], int]) -> int:
        return max(len(side[0]) - side[1], 1)

    lengths = torch.tensor([[scored(e.chosen), scored(e.rejected)] for e in encoded], dtype=torch.float32,
                           device=ref.device).reshape(-1, 2)
    return ref[:, 0] / lengths[:, 0] - ref[:, 1] / lengths[:, 1]


def evaluate_user(resident: ResidentModel, pairs: Sequence[PreferencePair], max_length: int,
                  batch_size: int = 64, *, personal_is_global: bool = False) -> dict[str, float]:
    """Accuracy of the three models on one user's held-out pairs: keys personalized, global, base.

    ``personal_is_global``: the caller knows the private tensors are at their initial values (a user who
    never trained), so the personalized model is the global one exactly: one forward pass fewer."""
    resident.model.eval()
    encoded = encode_pairs(resident.prompt_format, pairs, max_length)
    ref = reference_logps(resident, encoded, batch_size)
    with resident.adapters.private_strength(0.0):
        global_ = _policy_margins(resident, encoded, ref, batch_size)
    personal = global_ if personal_is_global else _policy_margins(resident, encoded, ref, batch_size)
    return {
        "personalized": _ranking_accuracy(personal),
        "global": _ranking_accuracy(global_),
        "base": _ranking_accuracy(base_margins(encoded, ref)),
    }
