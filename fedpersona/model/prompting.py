"""How a prompt and a response become one token sequence (the same for training, evaluation, generation)."""

from __future__ import annotations


def format_prompt(prompt: str) -> str:
    return f"user : {prompt.strip()} assistant :"


def encode_pair_side(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS, and how many leading ids are prompt (not scored).

    Prompt and response are tokenized apart so the boundary is exact for any tokenizer. When the
    whole is longer than ``max_length`` the prompt is cut from the left, keeping the response scored.
    """
    prompt_ids = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    response_ids = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)):]
    return prompt_ids + response_ids, len(prompt_ids)
