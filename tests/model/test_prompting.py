"""One formatting function: chat template when the tokenizer has one, an exact prompt/response boundary."""

import pytest

from fedpersona.model.prompting import PromptFormat, chat_messages, format_prompt

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = ["How do I boil an egg?", "Put it in boiling water for seven minutes, then cool it.",
        "Tell me about trains.\nThey are long.", "Sure: trains run on rails; most carry freight."] * 20


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) with a ChatML template and a system turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(TEXT + ["assistant\nPut", "user\nHow"] * 30, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def test_hh_rlhf_layout_becomes_alternating_turns():
    prompt = "Human: hi there\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant:"
    assert chat_messages(prompt) == [{"role": "user", "content": "hi there"},
                                     {"role": "assistant", "content": "hello!"},
                                     {"role": "user", "content": "what is 2+2?"}]
    assert chat_messages("  plain question? ") == [{"role": "user", "content": "plain question?"}]


@pytest.mark.parametrize("prompt,response", [
    ("How do I boil an egg?", "Put it in boiling water for seven minutes, then cool it."),
    ("Human: Tell me about trains.\n\nAssistant: They are long.\n\nHuman: And freight?",
     "Sure: trains run on rails; most carry freight."),
])
def test_chat_boundary_is_exact(bpe_tokenizer, prompt, response):
    fmt = PromptFormat(bpe_tokenizer)
    assert fmt.chat and fmt.name == "chat"
    ids, prompt_len = fmt.encode(prompt, response, max_length=512)
    generation_prompt = bpe_tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False,
                                                          add_generation_prompt=True)
    # the prompt part is exactly the template's generation prompt, the scored part exactly the response + EOS
    assert ids[:prompt_len] == bpe_tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    assert bpe_tokenizer.decode(ids[:prompt_len]) == generation_prompt
    assert ids[prompt_len:] == bpe_tokenizer(response, add_special_tokens=False)["input_ids"] + [bpe_tokenizer.eos_token_id]
    # and together they render the template's own transcript of the finished turn
    full = bpe_tokenizer.apply_chat_template([*chat_messages(prompt), {"role": "assistant", "content": response}],
                                             tokenize=False)
    assert full.startswith(bpe_tokenizer.decode(ids))
    # the generation path uses the very same prompt ids
    assert fmt.prompt_ids(prompt) == ids[:prompt_len]


def test_chat_template_off_or_absent_gives_the_plain_format(bpe_tokenizer, split_resident):
    plain = PromptFormat(bpe_tokenizer, use_chat_template=False)
    assert not plain.chat and plain.name == "plain"
    ids, prompt_len = plain.encode("hello", "world", 64)
    text = bpe_tokenizer(format_prompt("hello"), add_special_tokens=False)["input_ids"]
    assert ids[:prompt_len] == [bpe_tokenizer.bos_token_id, *text]
    # the embedded tokenizer has no template: its resident keeps the plain format it was trained on
    assert split_resident.prompt_format.name == "plain"


def test_long_conversations_drop_whole_turns_first_and_keep_the_response(bpe_tokenizer):
    fmt = PromptFormat(bpe_tokenizer)
    turns = "\n\n".join(f"Human: question number {i} about trains?\n\nAssistant: answer {i}." for i in range(8))
    prompt = turns + "\n\nHuman: And freight?"
    response = "Sure: trains run on rails; most carry freight."
    whole, _ = fmt.encode(prompt, response, 10_000)
    limit = len(whole) // 2
    ids, prompt_len = fmt.encode(prompt, response, limit)
    assert len(ids) <= limit
    assert ids[prompt_len:] == fmt.response_ids(response)  # the response is whole
    text = bpe_tokenizer.decode(ids[:prompt_len])
    assert "And freight?" in text and "question number 0" not in text
    # cut at a turn: the template's system turn, then a whole user turn
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nquestion")
