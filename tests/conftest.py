"""Suite-wide settings: one torch thread per process (2-core CI machines; Ray workers take their own)."""

import pytest
import torch

from fedpersona.model.embedded import build_tokenizer


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def split_resident():
    """The process's resident model for the default (split) scheme, restored after the test."""
    from fedpersona.round.resident import resident_for
    from fedpersona.config import RunConfig
    from fedpersona.model.adapters import Role

    resident = resident_for(RunConfig())
    yield resident
    resident.adapters.reset(Role.SHARED)
    resident.adapters.reset(Role.PRIVATE)


@pytest.fixture
def cli(capsys):
    """``cli("feedback", "add", ...)`` runs ``fedpersona ARGV`` in-process: (exit code, stdout, stderr)."""
    from fedpersona.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(list(argv))
        out, err = capsys.readouterr()
        return int(done.value.code or 0), out, err

    return run


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("how do i cook rice bake bread learn chess plan a trip write code fix my bike explain it "
         "briefly in detail with steps and examples sure here is short answer long friendly formal "
         "first then finally boil water add salt wait . , !").split()


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(folder, config_class, sizes, chat)``: a random tiny HF model of ``config_class`` (e.g.
    ``"LlamaConfig"``, sizes like ``hidden_size=16``) with a word-level tokenizer of matching vocabulary (a
    ChatML chat template when ``chat``), saved to ``folder``; returns the folder. Real HF loading paths are
    tested on such models (nothing can be downloaded here)."""

    def save(folder, config_class: str, sizes: dict, chat: bool):
        """A random tiny model of ``config_class`` with a tokenizer of matching vocabulary, saved to ``folder``."""
        import transformers

        tokenizer = build_tokenizer(WORDS)
        if chat:
            tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
            tokenizer.eos_token = "<|im_end|>"  # as ChatML models end a turn
            tokenizer.chat_template = CHATML
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **sizes)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return save


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test with real processes (SuperLink/SuperNode, a Ray cluster; "
                                       "runs by default)")
