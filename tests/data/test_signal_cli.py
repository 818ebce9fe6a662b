"""No-signal pairs and unreadable text through the real commands: `data inspect`, `feedback import` and
`simulate --data` say how many there are and what setting or model helps, one line each, exit 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedpersona.model.signal import READABLE_MODEL

# Words of the embedded model's vocabulary; the sides differ only after their first 120 tokens.
LONG = " ".join(["the model is good and you can start with a short habit"] * 10)
UNREADABLE = [("i like 😀", "i like 😢"), ("我喜欢猫", "我讨厌猫"), ("שלום עולם", "שלום לכם"),
              ("you can start", "you  can\tstart "), ("start with a short habit", "start with yoga")]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    """The issue's example: 2 users, 4 pairs each, chosen and rejected apart only past max-length 96."""
    return write(tmp_path / "truncated.jsonl", [
        {"user_id": f"u{u}", "prompt": f"how should i start running {i} ?", "chosen": LONG + " yoga",
         "rejected": LONG + " chess", "split": "test" if i == 0 else "train"} for u in range(2) for i in range(4)])


@pytest.fixture
def unreadable(tmp_path: Path) -> Path:
    """Pairs the embedded tokenizer cannot tell apart: emoji, CJK, Hebrew, white space; and a good one."""
    return write(tmp_path / "unreadable.jsonl", [
        {"user_id": "me", "prompt": f"how should i start {i} ?", "chosen": c, "rejected": r}
        for i, (c, r) in enumerate(UNREADABLE)])


def warnings(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "warning:" in line]


def needed_length() -> int:
    from fedpersona.model.signal import check_data
    from fedpersona.data.schema import PreferencePair

    pair = PreferencePair("u", "how should i start running 0 ?", LONG + " yoga", LONG + " chess")
    return check_data([pair], "embedded").max_length_needed


def test_inspect_counts_and_suggests(cli, truncated: Path, unreadable: Path) -> None:
    code, out, err = cli("data", "inspect", str(truncated))
    assert code == 0 and not warnings(err)
    rows = out.splitlines()
    assert [r for r in rows if r.startswith("no-signal pairs")] == [
        "no-signal pairs     8 of 8 pairs checked: chosen and rejected encode the same with model embedded "
        "(8 cut at max-length 96, 0 same ids at any length)"]
    n = needed_length()
    assert [r for r in rows if r.startswith("warning:")] == [
        f"warning: 8 of 8 pairs become the same token sequence at max-length 96: chosen and rejected differ only "
        f"past the tokens it keeps, so they carry no preference signal; max-length {n} (simulate --set "
        f"max-length={n}) keeps them apart"]

    code, out, err = cli("data", "inspect", str(unreadable), "--json")
    info = json.loads(out)
    assert code == 0 and not warnings(err)
    assert {k: info["encoding"][k] for k in ("pairs_checked", "identical_after_truncation", "identical_ids",
                                             "identical_whitespace")} == {
        "pairs_checked": 5, "identical_after_truncation": 0, "identical_ids": 4, "identical_whitespace": 1}
    assert info["encoding"]["unknown_share"] > 0.05
    same, unknown = info["warnings"]
    assert same.startswith("4 of 5 pairs encode chosen and rejected to the same token ids with model embedded")
    assert unknown.endswith(f"--model {READABLE_MODEL}")


def test_import_warns_once_per_problem(cli, tmp_path: Path, truncated: Path, unreadable: Path) -> None:
    code, out, err = cli("feedback", "import", str(truncated), "--state", str(tmp_path / "a"), "--as-user", "me")
    assert code == 0 and "imported 4 pairs" in out  # the two users' pairs are the same pairs
    assert warnings(err) == [
        f"fedpersona: warning: 8 of 8 pairs become the same token sequence at max-length 96: chosen and rejected "
        f"differ only past the tokens it keeps, so they carry no preference signal; the server's --set "
        f"max-length={needed_length()} keeps them apart"]

    code, out, err = cli("feedback", "import", str(unreadable), "--state", str(tmp_path / "b"), "--json")
    assert code == 0 and json.loads(out)["added"] == 5
    same, unknown = warnings(err)
    assert "4 of 5 pairs encode chosen and rejected to the same token ids" in same
    assert "are unknown (<unk>) to model embedded" in unknown and f"--model {READABLE_MODEL}" in unknown

    code, out, err = cli("feedback", "import", str(unreadable), "--state", str(tmp_path / "c"), "--no-check")
    assert code == 0 and err == ""


def test_simulate_warns_before_ray_starts(cli, monkeypatch, tmp_path: Path, truncated: Path) -> None:
    """The warning is printed once, before the simulation engine starts (stubbed here: a real run takes a
    minute; tests/simulations run real ones), and the summary carries the signal_* counts."""
    import flwr.simulation

    import fedpersona.server.app as server_app
    from fedpersona.server.federation import FederationResult, signal_keys
    from fedpersona.simulations import launcher

    prepared: list = []  # the run's configuration, as the server app would get it
    on_result: list = []  # the launcher's callback, as the real ServerApp would call it

    def prepare(config):
        prepared.append(real_prepare(config))
        return prepared[-1]

    def app(*_: object, on_result=None, **__: object) -> object:
        on_result_of.append(on_result)
        return object()

    on_result_of = on_result

    def engine(**_: object) -> None:
        print("engine starts", file=sys.stderr)
        on_result_of[-1](FederationResult({"num_users": 2, "rounds": 1, "train_answers": 2,
                                           **signal_keys(prepared[-1], deployment=False)}))  # as run_federation adds

    real_prepare = launcher.prepare_config
    monkeypatch.setattr(launcher, "prepare_config", prepare)
    monkeypatch.setattr(server_app, "make_server_app", app)
    monkeypatch.setattr(flwr.simulation, "run_simulation", engine)
    code, out, err = cli("simulate", "--data", str(truncated), "--rounds", "1", "--out", str(tmp_path / "out"),
                         "--json", "-q")
    assert code == 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("log: ")]  # the run's log path
    n = needed_length()
    assert lines == [f"fedpersona: warning: 8 of 8 pairs become the same token sequence at max-length 96: chosen "
                     f"and rejected differ only past the tokens it keeps, so they carry no preference signal; "
                     f"--set max-length={n} keeps them apart", "engine starts"]
    summary = json.loads(out)
    assert (summary["signal_identical_after_truncation"], summary["signal_max_length_needed"]) == (8, n)

    code, out, err = cli("simulate", "--data", str(truncated), "--rounds", "1", "--out", str(tmp_path / "out2"),
                         "--json", "-q", "--set", f"max-length={n}")
    assert code == 0 and [line for line in err.splitlines()
                          if line.strip() and not line.startswith("log: ")] == ["engine starts"]
    assert json.loads(out)["signal_identical_after_truncation"] == 0


def test_import_on_a_device_without_the_model_notes_it(cli, monkeypatch, tmp_path: Path, unreadable: Path) -> None:
    """Building an embedded model of another seed than the shipped one takes a while: an import does not do
    it, it says the check was skipped."""
    from fedpersona.device.state import DeviceState

    monkeypatch.setenv("FEDPERSONA_CACHE", str(tmp_path / "empty-cache"))
    with DeviceState(tmp_path / "s", create=True) as st:
        st.bind("embedded:7", "split")
    code, out, err = cli("feedback", "import", str(unreadable), "--state", str(tmp_path / "s"))
    assert code == 0 and "imported 5 pairs" in out
    assert err.strip() == ("fedpersona: note: pairs not checked against model embedded:7 (not built yet on this "
                           "device; `fedpersona client` builds it)")
    assert not (tmp_path / "empty-cache").exists()


def test_the_client_warns_at_start_up_about_stored_pairs(tmp_path: Path, truncated: Path) -> None:
    """Train time on a device: `fedpersona client` checks the stored pairs with the state's model."""
    from fedpersona.device.state import DeviceState
    from fedpersona.deploy.node import signal_warnings

    state = tmp_path / "state"
    with DeviceState(state) as st:
        st.memory.import_file(truncated, as_user="me")
    assert signal_warnings(state) == []  # not bound to a model yet: nothing to check with
    with DeviceState(state) as st:
        st.bind("embedded", "split")
    lines = signal_warnings(state)
    assert len(lines) == 1 and "max-length 96" in lines[0] and f"max-length={needed_length()}" in lines[0]
