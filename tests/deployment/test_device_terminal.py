"""A device that says what it does (issue 23, items 5 and 7, the device's part).

* ``fedpersona client``'s terminal shows a round's phases while it runs (reference log-probs, training
  step k of K, evaluation), the whole reason of a decline (which the server receives as a code only),
  and a stop line on Ctrl-C saying what was cut short: here in-process through the real ClientApp (the
  line of a round stopped mid-training); over real processes in ``test_device_policy.py``'s first round
  (the terminal lines, the server's files holding no device's reason, Ctrl-C).
* ``--quiet`` is quiet: the GGUF conversion draws no progress bar.
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpersona.config import SIMULATION_ONLY, RunConfig
from fedpersona.model.adapters import Role

def test_the_gguf_conversion_draws_no_progress_bar(capfd):
    """transformers' GGUF loader draws a plain tqdm bar that ignored every --quiet; the conversion runs it
    with the bar off (the loader's own ``tqdm``, as it calls it) and logs the conversion instead."""
    from transformers import modeling_gguf_pytorch_utils as loader

    from fedpersona.model.gguf import _no_loader_bar

    desc = "Converting and de-quantizing GGUF tensors..."
    list(loader.tqdm(range(3), desc=desc))
    assert "de-quantizing" in capfd.readouterr().err  # the bar as it was
    with _no_loader_bar():
        assert list(loader.tqdm(range(3), desc=desc)) == [0, 1, 2]
    captured = capfd.readouterr()
    assert "de-quantizing" not in captured.err + captured.out


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def test_a_rounds_phases_and_what_a_stop_would_cut_short(make_device, split_resident, monkeypatch):
    """The real ClientApp through ``reporting`` (what ``fedpersona client`` runs): the phase lines, and what
    the stop line would say at each point of the round."""
    from fedpersona.client import device as device_module
    from fedpersona.model.resident import RefLogpCache

    monkeypatch.setattr(split_resident, "ref_cache", RefLogpCache())  # as in a fresh process: nothing cached
    from fedpersona.client.app import app as client_app
    from fedpersona.deploy.node import Activity, reporting

    state = make_device(0)
    said: list[str] = []
    activity = Activity()
    during: list[str] = []
    run = reporting(client_app, lambda line: (said.append(line), during.append(activity.describe())), activity)
    flat = {k: v for k, v in RunConfig(max_steps=3, epochs=1, max_length=40, batch_size=4).to_flat().items()
            if k.replace("-", "_") not in SIMULATION_ONLY}
    split_resident.adapters.reset(Role.SHARED)
    config = ConfigRecord({**flat, "dp-epsilon": 8.0, "server-round": 1})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(split_resident.adapters.tensors(Role.SHARED)),
                                      "config": config}), dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"state-dir": str(state)}, state=RecordDict(), run_config={})
    try:
        reply = run(msg, context)
    finally:
        for opened in device_module._OPEN.values():
            opened.close()
        device_module._OPEN.clear()
    assert not reply.has_error()
    assert said[0] == "round 1: computing reference log-probs of 16 pairs (once per pair)"
    assert "round 1: training step 1 of 3" in said and "round 1: training step 3 of 3" in said
    assert said[-1].startswith("round 1: trained on your 16 training pairs")
    at_step_one = during[said.index("round 1: training step 1 of 3")]
    assert at_step_one == "round 1 was training step 1 of 3: it stops here, and nothing of it is sent"
    assert activity.describe() == "no round was running"
