"""The deployment commands' inputs and the command lines they build, without starting anything."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from fedpersona.client import device as dev
from fedpersona.device.state import DeviceState
from fedpersona.deploy.node import ClientOptions, StateGuard, supernode_command
from fedpersona.config import RunConfig
from fedpersona.data.schema import PreferencePair
from fedpersona.errors import UsageError
from fedpersona.server.app import split_run_config
from fedpersona.server.checkpoint import save_checkpoint
from fedpersona.deploy.control import Control, write_app
from fedpersona.deploy.server import ServerOptions
from fedpersona.deploy.superlink import SuperLinkOptions, TLSFiles, superlink_command

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tls"
    folder.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (folder / name).write_text("x")
    return folder


# ---- server --------------------------------------------------------------------------------------
def test_tls_is_required_unless_insecure_is_asked_for(tmp_path: Path, tls_dir: Path):
    config = RunConfig()
    with pytest.raises(UsageError, match="--certificates DIR"):
        ServerOptions(state=tmp_path).validate(config)
    with pytest.raises(UsageError, match="contradict"):
        ServerOptions(state=tmp_path, insecure=True, certificates=tls_dir).validate(config)
    (tls_dir / "server.key").unlink()
    with pytest.raises(UsageError, match="missing server.key"):
        ServerOptions(state=tmp_path, certificates=tls_dir).validate(config)
    assert ServerOptions(state=tmp_path, insecure=True).validate(config) is None


def test_auth_needs_tls_and_keys_need_auth(tmp_path: Path, tls_dir: Path):
    key = tmp_path / "node.pub"
    key.write_text("x")
    with pytest.raises(UsageError, match="needs TLS"):
        ServerOptions(state=tmp_path, insecure=True, enable_supernode_auth=True).validate(RunConfig())
    with pytest.raises(UsageError, match="--enable-supernode-auth"):
        ServerOptions(state=tmp_path, certificates=tls_dir, auth_keys=(key,)).validate(RunConfig())
    with pytest.raises(UsageError, match="file not found"):
        ServerOptions(state=tmp_path, certificates=tls_dir, enable_supernode_auth=True,
                      auth_keys=(tmp_path / "absent.pub",)).validate(RunConfig())


def test_an_earlier_checkpoint_needs_resume_or_fresh(tmp_path: Path, tls_dir: Path, monkeypatch):
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg
    import numpy as np

    from fedpersona.deploy import server as launch
    from fedpersona.strategies.validation import TensorSpec

    # --resume checks the tensors as the ServerApp does (against the model's; tests/server/test_server_reports.py)
    monkeypatch.setattr(launch, "shared_spec", lambda config: TensorSpec.of(ArrayRecord({"w": Array(np.zeros(2))})))

    config = RunConfig(rounds=4)
    options = ServerOptions(state=tmp_path, certificates=tls_dir)
    with pytest.raises(UsageError, match="no checkpoint"):
        ServerOptions(state=tmp_path, certificates=tls_dir, resume=True).validate(config)
    save_checkpoint(options.checkpoints, 2, ArrayRecord({"w": Array(np.zeros(2))}), FedAvg(), config={},
                    num_rounds=4)
    with pytest.raises(UsageError, match="add --resume to continue it, or --fresh"):
        options.validate(config)
    ServerOptions(state=tmp_path, certificates=tls_dir, resume=True).validate(config)
    ServerOptions(state=tmp_path, certificates=tls_dir, fresh=True).validate(config)
    with pytest.raises(UsageError, match="raise --rounds"):
        ServerOptions(state=tmp_path, certificates=tls_dir, resume=True).validate(config.replace(rounds=2))
    # a finished run's checkpoint does not block a new run
    save_checkpoint(options.checkpoints, 4, ArrayRecord({"w": Array(np.zeros(2))}), FedAvg(), config={},
                    num_rounds=4)
    options.validate(config)


def test_a_new_run_moves_the_earlier_outputs_aside(tmp_path: Path):
    from fedpersona.deploy.server import prepare_out

    options = ServerOptions(state=tmp_path, insecure=True)
    options.out_dir.mkdir(parents=True)
    (options.out_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    (options.out_dir / "summary.json").write_text("{}")
    archived = prepare_out(options, done=0)
    assert archived is not None and (archived / "summary.json").exists()
    assert (options.out_dir / "metrics.jsonl").read_text() == "" and not (options.out_dir / "summary.json").exists()
    (options.out_dir / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    assert prepare_out(options, done=1) is None  # resuming keeps round 1's row
    assert (options.out_dir / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_superlink_command(tmp_path: Path, tls_dir: Path):
    tls = TLSFiles.from_dir(tls_dir)
    command = superlink_command(SuperLinkOptions(state=tmp_path, port=9999, tls=tls, enable_supernode_auth=True))
    assert "--disable-runtime-dependency-installation" in command and "--insecure" not in command
    assert command[command.index("--database") + 1] == str((tmp_path / "superlink.db").resolve())
    assert command[command.index("--ssl-certfile") + 1] == str(tls.cert.resolve())
    assert "--enable-supernode-auth" in command and command[command.index("--port") + 1] == "9999"
    insecure = superlink_command(SuperLinkOptions(state=tmp_path))
    assert "--insecure" in insecure and "--ssl-certfile" not in insecure
    assert SuperLinkOptions(state=tmp_path, host="0.0.0.0", port=1).local_address == "127.0.0.1:1"


def test_the_submitted_app_carries_the_whole_run_config(tmp_path: Path):
    run_config = {**RunConfig(rounds=7).to_flat(), "out-dir": "/x/out", "resume": True, "deployment": True}
    app = tomllib.loads((write_app(tmp_path / "app", run_config) / "pyproject.toml").read_text())
    flwr = app["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "fedpersona.server.app:app", "clientapp": "fedpersona.client.app:app"}
    assert flwr["publisher"] == "fedpersona" and flwr["config"]["rounds"] == 7 and flwr["config"]["resume"] is True
    settings, run = split_run_config(flwr["config"])
    assert RunConfig.from_flat(settings).rounds == 7 and run == {"out-dir": "/x/out", "resume": True, "deployment": True}


def test_control_connection_config(tmp_path: Path):
    Control(home=tmp_path, address="127.0.0.1:9", root_certificates=tmp_path / "ca.crt").write_config()
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "fedpersona"
    assert config["superlink"]["fedpersona"] == {"address": "127.0.0.1:9",
                                                 "root-certificates": str((tmp_path / "ca.crt").resolve())}


# ---- client --------------------------------------------------------------------------------------
def test_client_options(tmp_path: Path):
    with pytest.raises(UsageError, match="HOST:PORT"):
        ClientOptions(server="nohost", state=tmp_path).validate()
    with pytest.raises(UsageError, match="file not found"):
        ClientOptions(server="h:1", state=tmp_path, root_certificates=tmp_path / "ca.crt").validate()
    key = tmp_path / "key"
    key.write_text("x")
    with pytest.raises(UsageError, match="needs TLS"):
        ClientOptions(server="h:1", state=tmp_path, insecure=True, auth_key=key).validate()
    with pytest.raises(UsageError, match="10 to 1800"):
        ClientOptions(server="h:1", state=tmp_path, insecure=True, heartbeat_interval=5).validate()


def test_supernode_command(tmp_path: Path):
    command = supernode_command(ClientOptions(server="10.0.0.1:9092", state=tmp_path, user_index=4), 5555)
    assert command[command.index("--node-config") + 1] == f"state-dir='{tmp_path.resolve()}' user-index=4"
    assert command[command.index("--isolation") + 1] == "process"  # tasks run in the client process
    assert command[command.index("--port") + 1] == "5555" and "--insecure" not in command
    cold = supernode_command(ClientOptions(server="h:1", state=tmp_path, insecure=True, cold=True,
                                           heartbeat_interval=10), 1)
    assert cold[cold.index("--isolation") + 1] == "subprocess" and "--insecure" in cold
    assert cold[1:3] == ["-m", "fedpersona.deploy.supernode_main"]


def test_one_client_per_state_directory(tmp_path: Path):
    with StateGuard(tmp_path):
        with pytest.raises(UsageError, match="another `fedpersona client`"):
            with StateGuard(tmp_path):
                pass
    with StateGuard(tmp_path):  # released
        pass


def test_device_store_bridges_the_ledger_and_the_round(tmp_path: Path):
    import torch

    with DeviceState(tmp_path / "d") as state:
        store = dev.DeviceStore(state, server_round=3)
        assert store.load_ledger() is None
        store.save_ledger(json.dumps({"version": 1, "spent": [1, 2]}))
        assert json.loads(store.load_ledger()) == {"version": 1, "spent": [1, 2]}
        store.save_private({"a.private.w": torch.ones(2)}, rounds_trained=5)
        assert store.rounds_trained() == 5 and state.counters()["last_round"] == 3


def test_device_readiness_and_stable_index(tmp_path: Path):
    with DeviceState(tmp_path / "d") as state:
        assert "fedpersona feedback import" in dev.readiness_problem(state)
        state.memory.add(PreferencePair("alice", "p1", "good", "bad", "train"))
        state.memory.add(PreferencePair("alice", "p2", "good", "bad", "test"))
        assert dev.readiness_problem(state) is None
        assert dev.device_user_index(state, {}) == dev.stable_index("alice") == dev.stable_index("alice")
        assert dev.device_user_index(state, {"user-index": 7}) == 7
        assert 0 <= dev.stable_index("bob") < 2**31
        assert "min-pairs" in dev.readiness_problem(state, min_pairs=4)


def test_device_mode_only_with_a_state_dir(tmp_path: Path):
    assert dev.device_for({"partition-id": 0}) is None
    with pytest.raises(UsageError):
        dev.device_for({"state-dir": str(tmp_path / "absent")})
    (tmp_path / "d").mkdir()
    assert dev.device_for({"state-dir": str(tmp_path / "d")}) is dev.device_for({"state-dir": str(tmp_path / "d")})


# ---- CLI -----------------------------------------------------------------------------------------
def run_cli(*args: str) -> int:
    from fedpersona.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(args))
    return int(done.value.code)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys):
    assert run_cli("server", "--state", str(tmp_path / "s")) == 2
    assert "--certificates DIR" in capsys.readouterr().err
    assert run_cli("client", "--server", "h:1", "--state", str(tmp_path / "none"), "--insecure") == 2
    err = capsys.readouterr().err
    assert "fedpersona feedback import" in err and len(err.strip().splitlines()) == 1
    # settings every device would decline stop the server before anything starts
    for setting in ("dp-reproducible=true", "attack=nan"):
        assert run_cli("server", "--state", str(tmp_path / "s"), "--insecure", "--set", setting,
                       *(("--set", "attack-users=1") if setting.startswith("attack") else ())) == 2
        err = capsys.readouterr().err
        assert "simulation-only" in err and len(err.strip().splitlines()) == 1


# ---- docker --------------------------------------------------------------------------------------
def test_compose_commands_parse_with_the_cli():
    """docker-compose.yml's commands, appended to the images' entrypoints, are valid CLI input."""
    import typer

    from fedpersona.cli import app

    command = typer.main.get_command(app)
    compose = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    entrypoints = {"Dockerfile.server": None, "Dockerfile.client": None}
    for name in entrypoints:
        text = (REPO / "docker" / name).read_text()
        line = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
        entrypoints[name] = json.loads(line.removeprefix("ENTRYPOINT").strip())
    services = compose["services"]
    assert set(services) == {"server", "client-1", "client-2"}
    assert services["server"]["command"][0] == "server"
    for name, service in services.items():
        dockerfile = service["build"]["dockerfile"].split("/")[-1]
        # compose fills ${NAME:-default} from the environment; the defaults are what runs without one
        argv = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", word)
                for word in entrypoints[dockerfile][1:] + service["command"]]
        assert not any("$" in word for word in argv), argv
        sub = command.get_command(click.Context(command), argv[0])
        sub.make_context(argv[0], list(argv[1:]))  # raises on an unknown option or a missing value
        mounts = service["volumes"]
        assert any(m.endswith(":/state") for m in mounts)
        assert any("/certs" in m and m.endswith(":ro") for m in mounts)
    # host networking: the devices reach the server on loopback (podman without a bridge, see docker/README.md)
    assert all(service.get("network_mode") == "host" for service in services.values())
