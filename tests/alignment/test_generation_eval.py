"""The final evaluation's text generation check on the embedded model (a pair file whose user ids name their
poles), the recorder's summary of it, and the end table's line."""

import json
import math

from fedpersona.alignment.generation import generate_batch
from fedpersona.alignment.judges import degeneration, pole_shares
from fedpersona.config import RunConfig
from fedpersona.data.synthetic import PreferenceSimulator
from fedpersona.display import _generation
from fedpersona.model.adapters import Role
from fedpersona.round.evaluate import PersonalViews, evaluate_round, generation_decodings
from fedpersona.round.resident import resident_for
from fedpersona.round.stores import MemoryStore
from fedpersona.round.train import train_round
from fedpersona.round.users import population_user, round_seed
from fedpersona.server.recorder import generation_summary

IDS = ("user0000-concise-formal-prose", "user0007-detailed-casual-list")


def _pair_file(tmp_path):
    sim = PreferenceSimulator("conflicting", 8, 0)
    rows = []
    for name, index in zip(IDS, (2, 5), strict=True):  # two users of opposite personas
        data = sim.user_data(index)
        rows += [{"user_id": name, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "split": p.split}
                 for p in data.train[:8] + data.test[:6]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_final_evaluation_judges_what_each_model_writes(tmp_path, split_resident):
    config = RunConfig(data=_pair_file(tmp_path), num_users=2, rounds=1, max_steps=2, min_steps=2, epochs=1,
                       gen_prompts=3, gen_max_tokens=12, gen_decoding="both", gen_memory_shots=1)
    user = population_user(config, 1)
    assert user.user_id == IDS[1]
    store = MemoryStore()
    shared = split_resident.adapters.tensors(Role.SHARED)
    result = train_round(config, user, 1, 1, shared, store)
    evaluation = evaluate_round(config, user, result.shared, store, index=1, extras={"server-round": 1})
    metrics = evaluation.metrics
    assert set(generation_decodings(config)) == {"greedy", "sampled"}
    for decoding in ("greedy", "sampled"):
        for model in ("personal", "global", "memory"):
            for measure in ("rep3", "distinct2", "words", "cut", "pole", "pole-length", "pole-tone", "pole-format"):
                value = metrics[f"gen-{decoding}-{model}-{measure}"]
                assert 0.0 <= value <= (12 if measure == "words" else 1.0), (decoding, model, measure, value)
        assert 0.0 <= metrics[f"gen-{decoding}-win-rate"] <= 1.0
    assert metrics["gen-win-rate"] == metrics["gen-greedy-win-rate"]

    # the greedy figures are those of the personal model's own answers, judged at the user's poles
    resident = resident_for(config)
    resident.adapters.load(result.shared, Role.SHARED)
    resident.adapters.load(store.load_private(), Role.PRIVATE)
    prompts = list(dict.fromkeys(p.prompt for p in user.test))[:3]
    answers = generate_batch(resident, prompts, max_new_tokens=12, seed=round_seed(config, 1, -2))
    texts, cuts = [a.text for a in answers], [a.cut for a in answers]
    assert metrics["gen-greedy-personal-rep3"] == degeneration(texts, cuts)["rep3"]
    shares = pole_shares(texts, cuts, {"length": "detailed", "tone": "casual", "format": "list"})
    assert metrics["gen-greedy-personal-pole-format"] == shares["format"]

    # with no private part the two models are one: identical figures, every judged case a tie
    views = PersonalViews(resident)
    personal, global_ = views.generate_batch(prompts, 12, same=True)
    assert personal is global_

    summary = generation_summary([metrics, {**metrics, "gen-greedy-personal-rep3": math.nan}])
    assert summary["users"] == 2 and summary["greedy"]["win_rate"] == metrics["gen-greedy-win-rate"]
    assert summary["greedy"]["personal"]["pole_length"] == metrics["gen-greedy-personal-pole-length"]
    assert summary["greedy"]["personal"]["rep3"] == metrics["gen-greedy-personal-rep3"]  # the NaN is skipped
    assert summary["sampled"]["memory"]["pole"] == metrics["gen-sampled-memory-pole"]
    line = _generation(summary)
    assert line.startswith("greedy: at pole") and "sampled:" in line and "repeated 3-grams" in line


def test_a_user_whose_id_names_no_poles_gets_degeneration_only(tmp_path, split_resident):
    path = tmp_path / "alice.jsonl"
    data = PreferenceSimulator("conflicting", 4, 0).user_data(2)
    path.write_text("".join(json.dumps({"user_id": "alice", "prompt": p.prompt, "chosen": p.chosen,
                                        "rejected": p.rejected, "split": p.split}) + "\n"
                            for p in data.train[:6] + data.test[:4]))
    config = RunConfig(data=str(path), num_users=1, rounds=1, max_steps=1, min_steps=1, epochs=1, gen_prompts=2,
                       gen_max_tokens=8)
    user = population_user(config, 0)
    evaluation = evaluate_round(config, user, split_resident.adapters.tensors(Role.SHARED), MemoryStore(),
                                index=0, extras={"server-round": 1})
    keys = {k for k in evaluation.metrics if k.startswith("gen-")}
    assert keys == {f"gen-sampled-{m}-{x}" for m in ("personal", "global") for x in ("rep3", "distinct2", "words", "cut")}
    # never trained: its personal model is the global one, generated once
    assert all(evaluation.metrics[f"gen-sampled-personal-{x}"] == evaluation.metrics[f"gen-sampled-global-{x}"]
               for x in ("rep3", "words", "cut"))
