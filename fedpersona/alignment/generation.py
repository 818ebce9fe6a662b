"""Personalized generation: base + shared + private adapter, with a strength knob.

``strength`` moves the private tensors from their initial values (0: the global model, base + shared)
to the user's trained values (1: fully personal), the decoding-time mixing of global and personal
behaviour of Personalized Soups (arXiv 2310.11564) reduced to one adapter. 0 and 1 are exact; in between,
the private A and B matrices both interpolate, so the adapter's effect grows smoothly, not linearly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpersona.model.resident import ResidentModel


@torch.no_grad()
def generate(resident: ResidentModel, prompts: Sequence[str], *, strength: float = 1.0, max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Generate one response per prompt; greedy when ``temperature`` is 0 (deterministic)."""
    if not 0.0 <= strength <= 1.0:
        from fedpersona.errors import UsageError

        raise UsageError(f"--strength {strength}: must be between 0 (global) and 1 (fully personal)")
    tokenizer, model = resident.tokenizer, resident.model
    model.eval()
    outputs = []
    with resident.adapters.private_strength(strength):
        for prompt in prompts:
            ids = resident.prompt_format.prompt_ids(prompt)  # the training format: chat template or plain
            input_ids = torch.tensor([ids], device=resident.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
            torch.random.set_rng_state(generator_state)
            outputs.append(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    return outputs
