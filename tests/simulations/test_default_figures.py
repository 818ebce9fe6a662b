"""scripts/check_default_figures.py (issue 23 item 6): a run whose figures moved fails the check, at the
decimals the docs print; the docs' generated block and inline figures are checked and regenerated from the
one results file. No simulation here: CI runs the real one (.ci/run) and this script on its summary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_default_figures.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_default_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SUMMARY = {"personalized_accuracy_mean": 0.8815104166666667, "personalized_accuracy_p10": 0.7125,
           "personalized_accuracy_min": 0.4166666666666667, "global_accuracy_mean": 0.6484375,
           "global_accuracy_p10": 0.171, "global_accuracy_min": 0.125, "base_accuracy_mean": 0.4635,
           "base_accuracy_p10": 0.1667, "base_accuracy_min": 0.125, "generation_win_rate": 0.572, "num_users": 32,
           "rounds": 15, "evaluated_users": 32, "shared_parameters": 17408, "private_parameters_per_user": 4352,
           "bytes_up_per_client_round": 75104.0, "rejected_replies": 0, "clipped_replies": 0,
           "weight_capped_replies": 12}


def test_the_stale_readme_figure_is_caught_at_the_printed_decimals(check):
    documented = check.figures_of({**SUMMARY, "personalized_accuracy_mean": 0.878, "personalized_accuracy_p10": 0.667})
    run = check.figures_of(SUMMARY)
    problems = check.differences(documented, run)
    assert problems == ["personalized_accuracy_mean: documented 0.878, this run 0.882",
                        "personalized_accuracy_p10: documented 0.667, this run 0.713"]
    # the last bits may differ across machines: equal at 3 decimals is equal
    assert check.differences(run, check.figures_of({**SUMMARY, "global_accuracy_mean": 0.64844})) == []
    # counts are exact: one honest reply rejected is a change
    assert check.differences(run, check.figures_of({**SUMMARY, "rejected_replies": 1})) == [
        "rejected_replies: documented 0, this run 1"]
    assert check.differences(run, check.figures_of({**SUMMARY, "global_accuracy_mean": 0.6494}), tolerance=1) == []


def test_another_machine_may_move_what_float_kernels_move_and_nothing_structural(check):
    """CI runs on another machine than the file's: means within 0.02, one user's tail within 0.09, bounded
    counts within 30% (at least 3); users, rounds, sizes and rejected replies exact; a real change still fails."""
    run = check.figures_of(SUMMARY)
    near = check.figures_of({**SUMMARY, "personalized_accuracy_mean": 0.8789, "personalized_accuracy_min": 0.4583,
                             "weight_capped_replies": 15})
    assert check.differences(run, near) != [] and check.differences(run, near, across_machines=True) == []
    for moved in ({"personalized_accuracy_mean": 0.85}, {"global_accuracy_min": 0.25}, {"rejected_replies": 1},
                  {"weight_capped_replies": 20}, {"shared_parameters": 17409}, {"rounds": 14}):
        key = next(iter(moved))
        assert [line.split(":")[0] for line in check.differences(run, check.figures_of({**SUMMARY, **moved}),
                                                                  across_machines=True)] == [key]


def test_the_docs_are_generated_from_the_file_and_checked_against_it(check, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"Intro.\n\n{check.BEGIN}\nan old table\n{check.END}\n\nIt prints personalized "
                    "<!-- fig:personalized_accuracy_mean -->0.878, global <!-- fig:global_accuracy_mean -->0.651.\n")
    figures = check.figures_of(SUMMARY)
    problems = check.docs_problems(figures, files=[page])
    assert len(problems) == 3 and "fig:personalized_accuracy_mean says 0.878, the file 0.882" in problems[1]
    assert check.docs_problems(figures, fix=True, files=[page]) == []
    text = page.read_text()
    assert "<!-- fig:personalized_accuracy_mean -->0.882, global <!-- fig:global_accuracy_mean -->0.648." in text
    assert "| personalized (base + shared + private) | 0.882 | 0.713 | 0.417 |" in text
    assert "17,408 shared parameters" in text and "replies rejected 0" in text
    assert check.docs_problems(figures, files=[page]) == []


def test_the_command_line_fails_on_a_moved_figure_and_passes_on_the_documented_run(check, tmp_path, monkeypatch,
                                                                                     capsys):
    results = tmp_path / "default-simulation.json"
    results.write_text(json.dumps({"figures": check.figures_of(SUMMARY)}))
    monkeypatch.setattr(check, "RESULTS", results)
    monkeypatch.setattr(check, "markdown_files", lambda: [])
    good, moved = tmp_path / "good.json", tmp_path / "moved.json"
    good.write_text(json.dumps(SUMMARY))
    moved.write_text(json.dumps({**SUMMARY, "base_accuracy_mean": 0.5}))
    assert check.main([str(good)]) == 0
    assert check.main([str(moved)]) == 1
    assert "base_accuracy_mean: documented 0.464, this run 0.500" in capsys.readouterr().err
    assert check.main([str(tmp_path / "missing.json")]) == 2


def test_the_repository_docs_agree_with_the_results_file(check):
    """What CI's docs build relies on: the committed figures file and every page that shows it agree."""
    documented = json.loads(check.RESULTS.read_text())["figures"]
    assert check.docs_problems(documented) == []
    assert any(check.BEGIN in p.read_text() for p in check.markdown_files())
