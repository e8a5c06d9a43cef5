"""systemd integration: the unit file verifies, and sd_notify datagrams arrive."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from memd.admin.telemetry import TelemetryClient
from memd.paths import telemetry_path
from memd.primary.daemon import build_parser
from memd.primary.notify import Watchdog, notify, notify_socket_address, watchdog_interval
from memd.testing import Daemon

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "memd.service"
ENV_FILE = ROOT / "systemd" / "memd.env"


# -- the unit ---------------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = UNIT
    exec_start = _unit_settings()["ExecStart"][0].split()[0]
    if not os.access(exec_start, os.X_OK):
        # verify insists that the binary exists: point ExecStart at a stand-in and
        # check everything else exactly as shipped
        stub = tmp_path / "memd"
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        unit = tmp_path / "memd.service"
        unit.write_text(UNIT.read_text().replace(f"ExecStart={exec_start} ", f"ExecStart={stub} "))
    proc = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memd.service" not in proc.stderr, proc.stderr  # no warnings about our unit


# -- the deployment recipe (docs/installation.md) --------------------------------------------

RECIPE_PAGE = ROOT / "docs" / "installation.md"
VENV = "/opt/memd"  # where the recipe puts memd, and what the unit runs
# Recipe steps that change the running system, not files: the test cannot do them
# under a temporary root (apt-get's packages are there in CI, .ci/run installs them).
SYSTEM_STEPS = ("apt-get ", "systemctl ", "memctl ")


def _recipe() -> list[str]:
    """The Debian 12 recipe's commands, as written in the docs."""
    text = RECIPE_PAGE.read_text()
    block = text.split("```sh\n# Debian 12, as root", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines()[1:] if line.strip()]


def test_recipe_and_unit_agree() -> None:
    """The unit runs what the recipe installs, from a path ProtectHome leaves visible."""
    recipe = _recipe()
    assert f"python3 -m venv {VENV}" in recipe
    assert f"{VENV}/bin/pip install ." in recipe
    assert "install -D -m 0644 systemd/memd.service /etc/systemd/system/memd.service" in recipe
    assert "install -D -m 0644 systemd/memd.env /etc/default/memd" in recipe
    s = _unit_settings()
    assert s["ExecStart"][0].split()[0] == f"{VENV}/bin/memd"
    assert s["ProtectHome"] == ["yes"]
    hidden = ("/home", "/root", "/run/user")  # what ProtectHome=yes hides
    assert not VENV.startswith(hidden)


def test_deployment_recipe_verifies(tmp_path: Path) -> None:
    """Run the recipe's file steps as written, under a temporary root (a real venv, a
    real `pip install .` of this checkout), then `systemd-analyze verify` the unit it
    installed, with only its paths moved under that root."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)

    def rooted(text: str) -> str:
        for path in (VENV, "/etc/", "/usr/local/bin"):
            text = text.replace(path, f"{root}{path}")
        return text

    ran = []
    for line in _recipe():
        if line.startswith("#") or line.startswith(SYSTEM_STEPS):
            continue
        # python3 is the interpreter running the tests (the recipe's is Debian's)
        cmd = rooted(line).replace("python3 -m venv", f"{shlex.quote(sys.executable)} -m venv")
        proc = subprocess.run(
            ["bash", "-euc", cmd],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"{line}: {proc.stdout}{proc.stderr}"
        ran.append(line)
    assert len(ran) == 5, ran  # venv, pip, links, unit, env file

    memd = root / VENV.lstrip("/") / "bin" / "memd"
    for tool in (memd, root / "usr/local/bin/memctl"):
        out = subprocess.run(
            [tool, "--version"], capture_output=True, text=True, timeout=60, check=True
        )
        assert re.search(r"\d+\.\d+", out.stdout), out.stdout
    installed = root / "etc/systemd/system/memd.service"
    assert installed.read_text() == UNIT.read_text()
    assert (root / "etc/default/memd").read_text() == ENV_FILE.read_text()
    unit = tmp_path / "memd.service"
    unit.write_text(rooted(installed.read_text()))
    proc = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memd.service" not in proc.stderr, proc.stderr


def test_unit_settings() -> None:
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and s["RuntimeDirectory"] == ["memd"]
    assert any(v.endswith("/etc/default/memd") for v in s["EnvironmentFile"])
    start = s["ExecStart"][0]
    assert "--runtime-dir /var/run" in start  # where dpdk-telemetry.py and memctl look
    assert "${MEMD_FILE_PREFIX}" in start and "$MEMD_OPTS" in start
    caps = s["CapabilityBoundingSet"][0].split()
    assert {"CAP_SYS_ADMIN", "CAP_IPC_LOCK"} <= set(caps)
    assert s["PrivateDevices"] == ["no"]  # a private /dev would hide /dev/hugepages
    assert s["LimitMEMLOCK"] == ["infinity"]
    assert "/run" in s["ReadWritePaths"]


def test_env_file_parses_as_systemd_reads_it() -> None:
    env: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.fullmatch(r'[A-Z_]+=("[^"]*"|\S*)', line), line
        key, _, value = line.partition("=")
        env[key] = value.strip('"')
    assert env["MEMD_FILE_PREFIX"] == "rte"
    assert shlex.split(env["MEMD_OPTS"])[0].startswith("-")


# -- sd_notify ---------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    with sock:
        yield sock, {"NOTIFY_SOCKET": path}


def test_ready_watchdog_stopping_arrive(
    notify_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = notify_socket
    assert notify(env, READY=1, STATUS="serving prefix rte")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving prefix rte"
    assert notify(env, WATCHDOG=1)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notify(env, stopping=True)
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_notify_socket() -> None:
    name = f"memd-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(30)
    with sock:
        env = {"NOTIFY_SOCKET": "@" + name}
        assert notify_socket_address(env) == b"\0" + name.encode()
        assert notify(env, READY=1)
        assert sock.recv(4096) == b"READY=1"


def test_notify_outside_systemd_is_a_no_op(tmp_path: Path) -> None:
    assert notify({}, READY=1) is False
    assert notify({"NOTIFY_SOCKET": "relative/path"}, READY=1) is False
    # the socket went away: still no exception
    assert notify({"NOTIFY_SOCKET": str(tmp_path / "gone")}, READY=1) is False
    assert notify({"NOTIFY_SOCKET": "/x"}) is False  # nothing to say


def test_notify_field_hygiene(notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = notify_socket
    assert notify(env, STATUS="two\nlines")
    assert sock.recv(4096) == b"STATUS=two lines"  # no forged second assignment
    with pytest.raises(ValueError):
        notify(env, **{"A=B": 1})


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 1
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None


def test_watchdog_pings_at_half_the_interval(
    notify_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = notify_socket
    wd = Watchdog.from_env({**env, "WATCHDOG_USEC": "10000000"})
    assert wd.enabled and wd.period == 5.0
    assert wd.tick(now=100.0)  # the first tick pings at once
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert not wd.tick(now=104.9)
    assert wd.tick(now=105.0)
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert wd.pings == 2
    off = Watchdog.from_env({})
    assert not off.enabled and not off.tick() and off.timeout_ms(default=250) == 250


# -- the daemon under a fake systemd ----------------------------------------------------------


def test_daemon_notifies_ready_watchdog_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rundir = Path(tempfile.mkdtemp(prefix="sd", dir="/tmp"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    d = Daemon(tmp_path, "nohuge", "-m", "4", runtime_dir=rundir)
    try:
        d.start()
        ready = d.wait_notify("READY=1")
        assert any(line.startswith("STATUS=") for line in ready.split("\n"))
        # READY=1 means a secondary can attach and the admin socket answers, at once
        with TelemetryClient(telemetry_path(d.prefix, str(rundir))) as c:
            assert c.greeting["pid"] == d.pid
        assert d.wait_notify("WATCHDOG=1") == "WATCHDOG=1"
        assert d.stop(signal.SIGTERM) == 0
        said = "\n".join(d.notifications).split("\n")
        assert "STOPPING=1" in said
        assert said.index("READY=1") < said.index("STOPPING=1")
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_env_file_options_are_accepted_by_memd() -> None:
    env = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value.strip('"')
    args = build_parser().parse_args(
        [
            "--runtime-dir",
            "/var/run",
            "--file-prefix",
            env["MEMD_FILE_PREFIX"],
            *shlex.split(env["MEMD_OPTS"]),
        ]
    )
    assert args.runtime_dir == "/var/run" and args.memory_mb == 512
