"""Methods from a researcher's own files: a scheme and a loss in the working directory run through
``fedpersona simulate`` (real Ray workers import them) and ``fp.simulate``; broken ones are one line, exit 2."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCHEME = textwrap.dedent('''
    """A shared LoRA adapter and a private head whose A is frozen at its seeded start (an FFA-style head)."""
    from fedpersona import AdapterLayout, Role, Scheme


    def layout(settings):
        def policy(name):
            if ".shared." in name:
                return Role.SHARED
            return Role.FROZEN if ".lora_A." in name else Role.PRIVATE

        return AdapterLayout({"shared": settings.shared_rank, "private": settings.private_rank}, policy)


    FROZEN_A_HEAD = Scheme("frozen-a-head", "shared LoRA + private LoRA with a frozen A", layout)
''')
LOSS = textwrap.dedent('''
    """DPO-Positive (Pal et al. 2024, arXiv 2402.13228): DPO with a penalty when the chosen answer's likelihood
    falls below the reference's. Every call is counted in calls.log beside this file."""
    from pathlib import Path

    import torch.nn.functional as F

    CALLS = Path(__file__).with_name("calls.log")


    def dpop(pc, pr, rc, rr, *, beta, lam=5.0, **_):
        with CALLS.open("a") as log:
            log.write("x")
        margin = (pc - rc) - (pr - rr) - lam * (rc - pc).clamp(min=0)
        return -F.logsigmoid(beta * margin)
''')
SMALL = ["--users", "4", "--rounds", "1", "--fraction", "1.0", "--set", "max-steps=2", "--set", "gen-prompts=0",
         "--quiet", "--no-checkpoints"]


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    (tmp_path / "myschemes.py").write_text(SCHEME)
    (tmp_path / "mylosses.py").write_text(LOSS)
    return tmp_path


def fedpersona(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("fedpersona")), *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_a_scheme_and_a_loss_of_ones_own_run_through_the_command_line(plugins: Path):
    import json

    done = fedpersona("simulate", *SMALL, "--scheme", "myschemes:FROZEN_A_HEAD", "--set", "loss=mylosses:dpop(lam=2)",
                      "--out", "out", "--json", cwd=plugins)
    assert done.returncode == 0, done.stderr
    summary = json.loads((plugins / "out" / "summary.json").read_text())
    assert (summary["scheme"], summary["num_users"]) == ("myschemes:FROZEN_A_HEAD", 4)
    # the private part is the B half of the private head only (its A is frozen): rank 2 x out_features per layer
    from fedpersona import RunConfig
    from fedpersona.round.resident import resident_for
    from fedpersona.model.adapters import Role

    split = resident_for(RunConfig(scheme="split")).adapters
    expected = sum(split.params[n].numel() for n in split.names(Role.PRIVATE) if ".lora_B." in n)
    assert summary["private_parameters_per_user"] == expected < split.count(Role.PRIVATE)
    assert (plugins / "calls.log").stat().st_size > 0  # the workers' training called the plug-in loss


def test_the_same_from_python(plugins: Path, monkeypatch):
    import fedpersona as fp

    monkeypatch.chdir(plugins)
    result = fp.simulate(num_users=3, rounds=1, fraction_train=1.0, max_steps=2, gen_prompts=0,
                         scheme="myschemes:FROZEN_A_HEAD", loss="mylosses:dpop")
    assert result.summary["scheme"] == "myschemes:FROZEN_A_HEAD" and result.config.loss == "mylosses:dpop"
    assert (plugins / "calls.log").stat().st_size > 0


def test_registered_names_work_too():
    import fedpersona as fp
    from fedpersona.alignment.losses import LOSSES, get_loss

    @fp.register_loss("half-dpo-test")
    def half(pc, pr, rc, rr, *, beta, **_):
        return 0.5 * get_loss("dpo")(pc, pr, rc, rr, beta=beta)

    try:
        assert fp.load_config(loss="HALF-DPO-test").loss == "half-dpo-test"  # case-insensitive, spelled as registered
        with pytest.raises(ValueError, match="registered already"):
            fp.register_loss("half-dpo-test", half)
    finally:
        LOSSES._items.pop("half-dpo-test")


@pytest.mark.parametrize("args,message", [
    (["--scheme", "nosuchmodule:X"], "--scheme nosuchmodule:X: no module 'nosuchmodule' in the working directory"),
    (["--scheme", "myschemes:NOPE"], "module myschemes has no 'NOPE'"),
    (["--scheme", "broken:S"], "importing broken failed (ZeroDivisionError: division by zero at "),
    (["--scheme", "myschemes:layout"], "building the scheme failed"),
    (["--set", "loss=mylosses:CALLS"], "not a loss"),
    (["--set", "loss=mylosses:dpop(gamma=1)"], "no argument 'gamma'; it takes lam"),
    (["--set", "loss=reducing:mean_dpo"], "must return one finite loss per pair (shape [n]), got ()"),
    (["--set", "loss=cdpo(label_smoothing=0.7)"], "label_smoothing=0.7: must be in [0, 0.5)"),
    (["--set", "loss=dpo(nope=1)"], "no argument 'nope'"),
    (["--set", "loss=mylosses:dpop(lam=x)"], "cannot read 'x' as float"),
    (["--set", "attack=mylosses:nothing", "--set", "attack-users=1"], "module mylosses has no 'nothing'"),
    (["--strategy", "mylosses:dpop"], "not a subclass of flwr.serverapp.strategy.Strategy"),
    (["--data", "nofmt:load:x.jsonl"], "file x.jsonl not found"),
])
def test_an_unknown_or_broken_plug_in_is_one_line_and_exit_2(plugins: Path, args, message):
    (plugins / "broken.py").write_text("S = 1 / 0\n")
    (plugins / "reducing.py").write_text("import torch.nn.functional as F\n\n"
                                         "def mean_dpo(pc, pr, rc, rr, *, beta, **_):\n"
                                         "    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()\n")
    done = fedpersona("simulate", *SMALL, *args, cwd=plugins)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpersona: error: "), done.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_shipped_losses_follow_their_papers():
    from fedpersona.alignment.losses import get_loss

    pc, pr = torch.tensor([-4.0, -6.0], requires_grad=True), torch.tensor([-5.0, -4.5])
    rc, rr, n = torch.tensor([-4.5, -5.5]), torch.tensor([-4.8, -5.0]), torch.tensor([4.0, 6.0])
    dpo = get_loss("dpo")(pc, pr, rc, rr, beta=0.5)
    # conservative DPO with no label noise is DPO; with noise e it is the expected DPO loss over flipped labels
    assert torch.allclose(get_loss("cdpo(label_smoothing=0)")(pc, pr, rc, rr, beta=0.5), dpo)
    flipped = get_loss("dpo")(pr, pc, rr, rc, beta=0.5)
    assert torch.allclose(get_loss("cdpo(label_smoothing=0.2)")(pc, pr, rc, rr, beta=0.5), 0.8 * dpo + 0.2 * flipped)
    # RPO adds alpha x the chosen answer's NLL per token, and so pulls the chosen log-prob up harder than DPO
    rpo = get_loss("rpo(alpha=2)")(pc, pr, rc, rr, beta=0.5, len_c=n, len_r=n)
    assert torch.allclose(rpo, dpo - 2 * pc / n)
    (grad_dpo,) = torch.autograd.grad(dpo.sum(), pc)
    (grad_rpo,) = torch.autograd.grad(rpo.sum(), pc)
    assert bool((grad_rpo < grad_dpo).all())  # a more negative gradient of the loss: a stronger push up
