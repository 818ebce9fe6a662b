"""The Python face: ``import fedpersona as fp`` is light, and ``fp.simulate`` runs real simulations on Ray,
several in one process, each returning its own results."""

import copy
import json
import subprocess
import sys

import pytest

SMALL = dict(rounds=1, fraction_train=1.0, max_steps=2, epochs=1, gen_prompts=0, cohort_size=8)


def test_import_is_light_and_every_public_name_resolves():
    code = ("import sys, fedpersona as fp\n"
            "assert 'torch' not in sys.modules and 'flwr' not in sys.modules, 'heavy import at import time'\n"
            "missing = [n for n in fp.__all__ if getattr(fp, n, None) is None]\n"
            "assert not missing, missing\n"
            "print(fp.__version__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    from fedpersona._version import __version__

    assert done.stdout.strip() == __version__


def test_an_unknown_name_is_an_attribute_error():
    import fedpersona as fp

    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fp.simulat  # noqa: B018


def test_two_simulations_in_one_process_keep_their_own_results(tmp_path, monkeypatch, tiny_model):
    """Different models and settings one after another: each result is its own run's (a second run neither
    changes the first result nor inherits its users, model or files)."""
    import fedpersona as fp

    monkeypatch.chdir(tmp_path)  # from any directory
    first = fp.simulate(num_users=4, **SMALL, out_dir=tmp_path / "first")
    frozen = copy.deepcopy(first.summary)
    model = tiny_model(tmp_path / "tiny-llama", "LlamaConfig", dict(hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), False)
    pairs = tmp_path / "pairs.jsonl"
    prompts = ["how do i cook rice", "how do i bake bread", "how do i learn chess", "how do i plan a trip",
               "how do i fix my bike"]
    rows = [{"user_id": user, "prompt": prompt, "chosen": good, "rejected": bad, "split": "test" if i >= 3 else "train"}
            for user, (good, bad) in {"alice": ("boil water", "add salt"), "bob": ("add salt", "boil water"),
                                      "carol": ("boil water", "wait")}.items() for i, prompt in enumerate(prompts)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = fp.simulate(model=str(model), data=str(pairs), scheme="fedsa", **SMALL, max_length=24,
                         chat_template=False)
    assert first.summary == frozen  # untouched by the second run
    assert (first.summary["num_users"], first.summary["scheme"], first.summary["model"]) == (4, "split", "embedded")
    assert (second.summary["num_users"], second.summary["scheme"]) == (3, "fedsa")
    assert second.summary["model"] == str(model) and second.out_dir is None
    assert len(first.per_user) == 4 and len(second.per_user) == 3
    assert [r["round"] for r in first.rounds] == [1] == [r["round"] for r in second.rounds]
    # what was written is what was returned
    assert json.loads((tmp_path / "first" / "summary.json").read_text()) == first.summary
    assert (tmp_path / "first" / "accuracy_per_round.png").stat().st_size > 1000  # simulate writes its plot
    assert 0.0 <= second.summary["personalized_accuracy_mean"] <= 1.0


def test_settings_by_name_reach_the_run_and_bad_ones_are_usage_errors():
    import fedpersona as fp

    config = fp.load_config({"num-users": 5}, rounds=2, loss="cdpo(label_smoothing=0.2)", strategy="fedadam(eta=0.01)")
    assert (config.num_users, config.rounds, config.loss, config.strategy) == (5, 2, "cdpo(label_smoothing=0.2)",
                                                                               "FedAdam(eta=0.01)")
    dp = fp.load_config(dp_epsilon=8)
    assert dp.scheme == "pal" and "scheme=pal" in dp.dp_defaults_applied  # the DP defaults, as on the CLI
    with pytest.raises(fp.UsageError, match="unknown setting 'num_user'"):
        fp.simulate(num_user=4)
    with pytest.raises(fp.UsageError, match="rounds=0 is invalid"):
        fp.simulate(rounds=0)


def test_the_version_is_the_same_in_pyproject_and_the_package():
    """Flower Apps need a static ``version`` in pyproject.toml (``flwr run .`` refuses a dynamic one)."""
    import tomllib
    from pathlib import Path

    from fedpersona._version import __version__

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__ and "version" not in project.get("dynamic", [])
