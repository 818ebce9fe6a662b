"""The progress line and the end table show rejected and declined replies, and only when there are some."""

from __future__ import annotations

from rich.console import Console

from fedpersona.display import ConsoleReporter, set_apart, summary_table

SUMMARY = {"num_users": 4, "rounds": 2, "scheme": "split", "strategy": "FedAvg", "shared_parameters": 10,
           "private_parameters_per_user": 2, "bytes_up_per_client_round": 40.0, "epsilon_max": None,
           "wall_seconds": 1.0, "rejected_replies": 0, "rejected_reasons": {}, "declined_reasons": {}}


def test_round_line_names_reasons_of_both_phases(capsys):
    row = {"round": 1, "train_replies": 3, "wall_seconds": 2.0, "train_rejected_reasons": {"non-finite": 1},
           "eval_rejected_reasons": {"non-finite": 1, "bad-metric": 1}, "train_declined_reasons": {"new-user": 1},
           "eval_declined_reasons": {}}
    assert set_apart(row) == "rejected 3 (non-finite 2, bad-metric 1)  declined 1 (new-user 1)"
    assert set_apart({"round": 1, "train_rejected_reasons": {}, "train_declined_reasons": {}}) == ""
    reporter = ConsoleReporter(Console(file=None, force_terminal=False))
    reporter.start(2)
    reporter.round_done(row)
    line = " ".join(capsys.readouterr().err.split())
    assert "users trained 3 rejected 3 (non-finite 2, bad-metric 1) declined 1 (new-user 1) [2s]" in line


def _text(summary) -> str:
    console = Console(width=200, record=True, force_terminal=False)
    console.print(summary_table(summary))
    return console.export_text()


def test_end_table_has_a_line_only_when_replies_were_set_apart():
    assert "rejected replies" not in _text(SUMMARY) and "declined replies" not in _text(SUMMARY)
    text = _text({**SUMMARY, "rejected_replies": 2, "rejected_reasons": {"wrong-shape": 2},
                  "declined_reasons": {"budget-spent": 1}})
    assert "rejected replies (dropped before aggregation)  2 (wrong-shape 2)" in text
    assert "declined replies" in text and "1 (budget-spent 1)" in text


def test_a_global_row_that_is_the_base_model_says_so():
    def text(scheme: str) -> str:
        console = Console(width=200, record=True)
        console.print(summary_table({**SUMMARY, "scheme": scheme, "global_accuracy_mean": 0.5}))
        return console.export_text()

    assert "FedSA shares no B" in text("fedsa") and "nothing is shared" in text("local")
    assert "global (base+shared)" in text("split") and "FedSA" not in text("split")


def test_off_a_terminal_each_phase_is_announced_and_the_last_one_named(capsys):
    reporter = ConsoleReporter(Console(file=None, force_terminal=False))
    reporter.live = False
    reporter.start(2)
    reporter.phase(1, "train")
    reporter.replies(0, 4)
    reporter.replies(2, 4)  # within the heartbeat: no line
    reporter.phase(2, "evaluate")
    reporter.replies(0, 4)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["round 1/2 train: 0/4 users replied", "round 2/2 final evaluation: 0/4 users replied"]


def test_failed_replies_are_on_the_round_line():
    assert set_apart({"round": 1, "train_replies": 1, "train_failures": 2}) == "failed 2"
