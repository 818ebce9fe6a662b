"""Response log-probs in bounded memory equal the plain full-softmax computation, values and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedpersona.alignment import logprobs
from fedpersona.alignment.batching import collate
from fedpersona.alignment.logprobs import full_softmax_logprobs, head_split_ok, sequence_logprobs

VOCAB = 3000


@pytest.fixture(scope="module")
def lora_model():
    """A tiny random Llama with a vocabulary large enough to chunk, and a LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                init_lora_weights=False))
    model.eval()
    return model


def _sides():
    """Rows whose prompts and responses differ in length: right padding after short rows, the boundary
    at a different column in each row, one row with a one-token response, one with a one-token prompt."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [(ids(9) + ids(6), 9), (ids(3) + ids(12), 3), (ids(14) + ids(1), 14), (ids(1) + ids(7), 1),
            (ids(5) + ids(5), 5)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_bytes", [logprobs.LOGIT_CHUNK_BYTES, 4 * VOCAB * 7])  # one chunk / many chunks
def test_values_and_gradients_equal_the_full_softmax(lora_model, monkeypatch, chunk_bytes):
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_BYTES", chunk_bytes)
    batch = collate(_sides(), pad_id=0)
    assert head_split_ok(lora_model.get_base_model())

    lora_model.zero_grad()
    want, want_n = full_softmax_logprobs(lora_model, batch)
    want.sum().backward()
    want_grads = _grads(lora_model)
    lora_model.zero_grad()
    got, got_n = sequence_logprobs(lora_model, batch)
    got.sum().backward()
    got_grads = _grads(lora_model)

    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got_n, want_n) and got_n.tolist() == [6, 12, 1, 7, 5]
    assert set(got_grads) == set(want_grads) and got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


def test_fallback_for_models_whose_head_cannot_be_split(lora_model, monkeypatch):
    lm = lora_model.get_base_model()
    monkeypatch.setattr(lm, logprobs._SPLIT_OK_ATTR, False)
    batch = collate(_sides(), pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(lora_model, batch)[0], full_softmax_logprobs(lora_model, batch)[0],
                                   rtol=0, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_length_by_vocab_tensor_is_materialised(lora_model, monkeypatch):
    """The largest tensor made (forward and backward) stays under a chunk's logits, while the plain
    computation makes [rows, length, vocab] ones: the bound holds by construction, not by luck."""
    chunk_rows = 7
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_BYTES", 4 * VOCAB * chunk_rows)
    batch = collate(_sides(), pad_id=0)
    rows, width = batch.input_ids.shape
    with _LargestTensor() as plain:
        full_softmax_logprobs(lora_model, batch)[0].sum().backward()
    with _LargestTensor() as bounded:
        sequence_logprobs(lora_model, batch)[0].sum().backward()
    assert plain.largest >= rows * (width - 1) * VOCAB
    largest_weight = max(p.numel() for p in lora_model.parameters())  # views of weights (e.g. the head's .t())
    assert bounded.largest <= max(chunk_rows * VOCAB, largest_weight) < rows * (width - 1) * VOCAB
