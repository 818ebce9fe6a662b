"""Decoding-time personalization: the log-prob mixing itself, the two views of one resident model, and the
token loop (KV caches, seeded sampling) against ``model.generate`` and against a loop without caches."""

from __future__ import annotations

import math

import pytest
import torch

from fedpersona.alignment.generation import TextStream, check_personalization, decode, generate, stream_text
from fedpersona.alignment.mixing import MAX_MIX_WEIGHT, mix_logprobs, private_views
from fedpersona.errors import UsageError
from fedpersona.model.adapters import Role

PROMPT = "how do I learn python?"


def test_mixing_is_the_normalised_geometric_mixture() -> None:
    g = torch.Generator().manual_seed(0)
    personal, global_ = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g) * 2
    lp, lg = personal.log_softmax(-1), global_.log_softmax(-1)
    assert torch.allclose(mix_logprobs(personal, global_, 1.0), lp)
    assert torch.allclose(mix_logprobs(personal, global_, 0.0), lg)
    for w in (0.3, 1.0, 1.7, 3.0):
        mixed = mix_logprobs(personal, global_, w)
        assert mixed.shape == (3, 50) and mixed.dtype == torch.float32
        assert torch.allclose(mixed.exp().sum(-1), torch.ones(3), atol=1e-5)
        # p ∝ p_personal^w * p_global^(1-w): differences of log-probs between tokens are the mixture's
        expected = w * lp + (1 - w) * lg
        assert torch.allclose(mixed - mixed[:, :1], expected - expected[:, :1], atol=1e-4)
    # raw logits and their log-softmax give the same mixture (normalisation constants cancel)
    assert torch.allclose(mix_logprobs(personal + 5, global_ - 3, 0.4), mix_logprobs(personal, global_, 0.4), atol=1e-5)
    # bf16 in, float32 out; any leading dimensions
    out = mix_logprobs(personal.bfloat16().view(3, 1, 50), global_.bfloat16().view(3, 1, 50), 0.5)
    assert out.shape == (3, 1, 50) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="different shapes"):
        mix_logprobs(personal, global_[:, :10], 0.5)


def test_a_token_either_model_rules_out_stays_ruled_out() -> None:
    personal = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]])
    global_ = torch.tensor([[float("-inf"), 1.0, 0.0, 0.0]])
    for w in (0.5, 2.0, MAX_MIX_WEIGHT):  # above 1 the global term's coefficient is negative
        mixed = mix_logprobs(personal, global_, w)
        assert mixed[0, 0] == float("-inf") and mixed[0, 3] == float("-inf")
        assert torch.isfinite(mixed[0, 1:3]).all() and math.isclose(float(mixed.exp().sum()), 1.0, rel_tol=1e-5)


def test_methods_and_their_ranges() -> None:
    check_personalization("weights", 0.0)
    check_personalization("logits", MAX_MIX_WEIGHT)
    for method, strength, match in (("weights", 1.5, "between 0 .global. and 1"), ("logits", 4.5, "--method logits"),
                                    ("logits", -0.1, "--method logits"), ("soups", 1.0, "--method soups")):
        with pytest.raises(UsageError, match=match):
            check_personalization(method, strength)


@pytest.fixture
def personal(split_resident):
    """The resident model with private tensors that differ from their initial values (a personal model)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in split_resident.adapters.names(Role.PRIVATE):
            param = split_resident.adapters.params[name]
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return split_resident


def _private(resident) -> dict[str, torch.Tensor]:
    return resident.adapters.tensors(Role.PRIVATE)


def test_views_switch_and_restore(personal) -> None:
    before = _private(personal)
    with private_views(personal.adapters) as views:
        assert views.differ
        views.use("global")
        assert all(torch.equal(personal.adapters.params[n], personal.adapters.initial[n]) for n in views.names)
        views.use("personal")
        assert all(torch.equal(t, before[n]) for n, t in _private(personal).items())
        views.use("global")
    assert all(torch.equal(t, before[n]) for n, t in _private(personal).items())


def test_the_token_loop_is_model_generate(personal) -> None:
    """The weights method through ``decode`` gives ``model.generate``'s tokens (greedy, and sampled with the same
    seed); logits at weight 0 is the global and at 1 the personal model; the private tensors are back after."""
    ids = personal.prompt_format.prompt_ids(PROMPT)
    text = lambda tokens: personal.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()  # noqa: E731
    before = _private(personal)
    for strength in (0.0, 0.5, 1.0):
        assert text(decode(personal, ids, strength=strength, max_new_tokens=20)) == \
            generate(personal, [PROMPT], strength=strength, max_new_tokens=20)[0]
    assert text(decode(personal, ids, method="logits", strength=0.0, max_new_tokens=20)) == \
        generate(personal, [PROMPT], strength=0.0, max_new_tokens=20)[0]
    assert generate(personal, [PROMPT], method="logits", strength=1.0, max_new_tokens=20, temperature=0.9, seed=4) == \
        generate(personal, [PROMPT], strength=1.0, max_new_tokens=20, temperature=0.9, seed=4)
    assert generate(personal, [PROMPT], strength=0.0, max_new_tokens=20) != \
        generate(personal, [PROMPT], strength=1.0, max_new_tokens=20)  # the two models differ
    # stopped early: the private tensors are restored when the generator is closed
    tokens = decode(personal, ids, method="logits", strength=0.5, max_new_tokens=20)
    next(tokens)
    tokens.close()
    assert all(torch.equal(t, before[n]) for n, t in _private(personal).items())


@torch.no_grad()
def test_logit_mixing_with_two_kv_caches_matches_full_forwards(personal) -> None:
    """Two forwards per token, each with its own KV cache, while the private tensors switch between them:
    the same tokens as recomputing both models over the whole sequence at every step."""
    ids = personal.prompt_format.prompt_ids(PROMPT)
    weight, steps = 1.8, 16
    got = list(decode(personal, ids, method="logits", strength=weight, max_new_tokens=steps))
    sequence, expected = list(ids), []
    stops = {personal.tokenizer.eos_token_id}
    with private_views(personal.adapters) as views:
        for _ in range(steps):
            x = torch.tensor([sequence])
            views.use("personal")
            lp = personal.model(input_ids=x).logits[0, -1]
            views.use("global")
            lg = personal.model(input_ids=x).logits[0, -1]
            token = int(mix_logprobs(lp, lg, weight).argmax())
            if token in stops:
                break
            expected.append(token)
            sequence.append(token)
    assert got == expected and len(got) > 3
    # sampling is reproducible with a seed and differs between seeds
    run = lambda seed: list(decode(personal, ids, method="logits", strength=0.5, max_new_tokens=12,  # noqa: E731
                                   temperature=1.0, seed=seed))
    assert run(1) == run(1) and run(1) != run(2)


def test_streamed_pieces_are_the_answer(personal) -> None:
    ids = personal.prompt_format.prompt_ids(PROMPT)
    pieces = list(stream_text(personal, ids, method="logits", strength=0.5, max_new_tokens=24))
    assert len(pieces) > 3
    assert "".join(pieces).strip() == generate(personal, [PROMPT], method="logits", strength=0.5,
                                               max_new_tokens=24)[0]


def test_text_stream_waits_for_whole_characters() -> None:
    class Bytes:  # a byte-level tokenizer: one token per UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    pieces = [stream.push(b) for b in " héllo".encode()]
    assert pieces[:3] == ["", "h", ""] and "".join(pieces) + stream.finish() == "héllo" == stream.text
