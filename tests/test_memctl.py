"""memctl against a live admin socket (fake memory), with none, and as an outsider."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from support.fake_admin import FakeMem

import memd
from memd.admin.api import AdminAPI
from memd.admin.telemetry import TelemetryServer
from memd.cli import memctl
from memd.testing import Daemon

ROOT = str(Path(__file__).resolve().parent.parent)
COMMANDS = ["status", "memsegs", "heaps", "memzones", "mempools", "rings", "processes"]


@pytest.fixture
def rundir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="mc", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mem() -> FakeMem:
    return FakeMem.populated()


@pytest.fixture
def server(rundir: str, mem: FakeMem) -> Iterator[TelemetryServer]:
    with TelemetryServer(AdminAPI(mem), rundir, "mc") as srv:
        yield srv


def run(
    capsys: pytest.CaptureFixture[str], rundir: str, *argv: str, prefix: str = "mc"
) -> tuple[int, str, str]:
    code = memctl.main(["--runtime-dir", rundir, "--file-prefix", prefix, *argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- against a live server ------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_human_tables(
    server: TelemetryServer, rundir: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, rundir, command)
    assert code == 0 and err == ""
    assert out.strip() and not out.lstrip().startswith(("{", "["))


def test_human_output_content(
    server: TelemetryServer, rundir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, rundir, "status")
    assert code == 0
    assert re.search(r"^prefix\s+fake$", out, re.M)
    assert re.search(r"^processes\s+2 \(1 primary, 1 secondary\)$", out, re.M)
    assert "16 MiB total" in out and "5 MiB free" in out
    _, out, _ = run(capsys, rundir, "rings")
    head, rx, tx = out.splitlines()
    assert head.split()[:6] == ["Name", "Capacity", "Used", "Free", "Size", "Esize"]
    assert rx.split()[:7] == ["rx", "1023", "10", "1013", "1024", "8", "MP"]
    assert tx.split()[5:8] == ["24", "SP", "SC"]  # a ring of 24-byte records
    _, out, _ = run(capsys, rundir, "memzones")
    assert len(out.splitlines()) == 4 and "zone_2" in out and "3 MiB" in out
    _, out, _ = run(capsys, rundir, "mempools")
    assert out.splitlines()[1].split()[:7] == ["mbuf_pool", "1023", "2", "KiB", "32", "923", "100"]
    _, out, _ = run(capsys, rundir, "processes")
    assert "worker" in out and "secondary" in out
    _, out, _ = run(capsys, rundir, "reclaims")
    head, first, second = out.splitlines()
    assert "In flight returned" in head
    assert first.split()[1:6] == ["4242", "3", "7", "13", "mbuf_pool"]
    assert second.split()[1:5] == ["4243", "4", "0", "busy"]  # recovery retried later


@pytest.mark.parametrize("command", COMMANDS)
def test_json_output(
    server: TelemetryServer,
    rundir: str,
    command: str,
    mem: FakeMem,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, rundir, "--json", command)
    assert code == 0 and err == ""
    data = json.loads(out)
    expected = {
        "memsegs": len(mem.segs),
        "heaps": 1,
        "memzones": len(mem.zones),
        "mempools": 1,
        "rings": 2,
        "processes": 2,
    }
    if command == "status":
        assert data["info"]["prefix"] == "fake" and data["stats"]["rings"] == 2
        assert data["greeting"]["max_output_len"] == 16384
    else:
        assert len(data) == expected[command]


def test_json_flag_after_the_command(
    server: TelemetryServer, rundir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = memctl.main(["heaps", "--json", "--runtime-dir", rundir, "--file-prefix", "mc"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)[0]["Name"] == "socket_0"


def test_memsegs_pages_past_the_reply_limit(
    rundir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mem = FakeMem.populated(n_segs=1500)
    with TelemetryServer(AdminAPI(mem), rundir, "many"):
        code, out, _ = run(capsys, rundir, "--json", "memsegs", prefix="many")
    assert code == 0 and [s["slot"] for s in json.loads(out)] == list(range(1500))


def test_raw_telemetry(
    server: TelemetryServer, rundir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, rundir, "--json", "telemetry", "/eal/heap_list")
    assert code == 0 and out == '{"/eal/heap_list": [0]}\n'
    code, out, _ = run(capsys, rundir, "telemetry", "/help,/eal/heap_info")
    assert code == 0 and json.loads(out) == {
        "/help": {"/eal/heap_info": "Returns malloc heap stats. Parameters: int heap_id"}
    }
    code, out, _ = run(capsys, rundir, "telemetry", "/nope")
    assert code == 0 and json.loads(out) == {"/nope": None}


METRIC_LINE = re.compile(r'^memd_[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)+\})? -?[0-9.e+]+$')


def test_metrics_prometheus_text(
    server: TelemetryServer, rundir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, rundir, "metrics")
    assert code == 0 and out.endswith("\n")
    seen_type: set[str] = set()
    samples: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and name not in seen_type
            seen_type.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            assert METRIC_LINE.match(line), line
            name = re.split(r"[{ ]", line)[0]
            assert name in seen_type, f"{name} sample before its TYPE"
            key, value = line.rsplit(" ", 1)
            samples[key] = value
    assert samples["memd_up"] == "1"
    assert samples['memd_heap_size_bytes{heap="0",name="socket_0"}'] == str(16 * 2**20)
    assert samples['memd_ring_used{ring="rx"}'] == "10"
    assert samples['memd_mempool_in_use{mempool="mbuf_pool"}'] == "100"
    assert samples['memd_processes{role="secondary"}'] == "1"
    assert samples['memd_memseg_bytes{socket="0",page_size="2097152"}'] == str(16 * 2**20)
    assert int(samples["memd_admin_requests_total"]) > 0


def test_metrics_escape_label_values() -> None:
    data: dict[str, Any] = {
        "status": {"info": {"prefix": 'a"b\\c\nd'}, "stats": {}, "greeting": {}},
        "heaps": [],
        "memzones": [],
        "rings": [],
        "mempools": [],
        "processes": [],
        "memsegs": [],
    }
    text = memctl.format_metrics(data)
    assert 'prefix="a\\"b\\\\c\\nd"' in text


# -- no daemon, or not ours ------------------------------------------------------------------


def _memctl(
    *argv: str, user: list[str] | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [*(user or []), python, "-m", "memd.cli.memctl", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        cwd="/",
    )


@pytest.mark.parametrize("command", [*COMMANDS, "metrics"])
def test_no_daemon_is_one_line_and_exit_1(
    rundir: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, rundir, command, prefix="absent")
    assert code == 1 and out == ("" if command != "metrics" else memctl.format_down())
    assert len(err.splitlines()) == 1
    assert err.startswith("memctl: no memd admin socket at ") and "absent" in err


def test_metrics_without_a_daemon_says_it_is_down(rundir: str) -> None:
    """A textfile collector must report memd down, not keep its last figures: with no
    daemon, `memctl metrics` prints memd_up 0 (with its HELP and TYPE lines, as when
    it is up) and still exits 1."""
    proc = _memctl("--runtime-dir", rundir, "--file-prefix", "absent", "metrics")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.splitlines() == [
        "# HELP memd_up 1 if memd answered on its admin socket",
        "# TYPE memd_up gauge",
        "memd_up 0",
    ]
    assert len(proc.stderr.splitlines()) == 1 and "absent" in proc.stderr


def test_no_daemon_as_a_real_process(rundir: str) -> None:
    proc = _memctl("--runtime-dir", rundir, "--file-prefix", "absent", "status")
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_stale_socket_file_is_no_daemon(rundir: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(rundir, "dpdk", "stale")
    d.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(d / "dpdk_telemetry.v2"))
    s.close()
    code, _, err = run(capsys, rundir, "status", prefix="stale")
    assert code == 1 and len(err.splitlines()) == 1


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        memctl.main(["frobnicate"])
    assert exc.value.code == 2


def test_refused_user_gets_one_line(rundir: str, mem: FakeMem) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run memctl as nobody")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    with TelemetryServer(AdminAPI(mem), rundir, "mc", socket_mode=0o666):
        # the system python: the test venv may live where nobody cannot read
        proc = _memctl(
            "--runtime-dir",
            rundir,
            "--file-prefix",
            "mc",
            "status",
            user=nobody,
            python="/usr/bin/python3",
        )
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("memctl: memd: permission denied: uid 65534")


# -- hugepages (delegates to memd.cli.hugepages_admin) ------------------------------------------


class Row(NamedTuple):
    page_size: int
    node: int | None
    total: int
    free: int
    mounts: tuple[str, ...]


class Res(NamedTuple):
    page_size: int
    node: int | None
    previous: int
    requested: int
    got: int
    path: str


@pytest.fixture
def fake_admin(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    mod = types.ModuleType("memd.cli.hugepages_admin")

    def show() -> list[Row]:
        calls.append(("show", None))
        return [Row(2 << 20, 0, 512, 500, ("/dev/hugepages",)), Row(1 << 30, 0, 0, 0, ())]

    def reserve(**kw: Any) -> Res:
        calls.append(("reserve", kw))
        return Res(2 << 20, kw.get("node"), 0, 512, 512, "/sys/x")

    def mount(path: str, **kw: Any) -> bool:
        calls.append(("mount", (path, kw)))
        return True

    def clear() -> list[Res]:
        calls.append(("clear", None))
        return [Res(2 << 20, None, 512, 0, 0, "/sys/x")]

    mod.show = show  # type: ignore[attr-defined]
    mod.reserve = reserve  # type: ignore[attr-defined]
    mod.mount = mount  # type: ignore[attr-defined]
    mod.clear = clear  # type: ignore[attr-defined]
    mod.format_rows = lambda rows: "\n".join(f"{r.page_size} {r.node} {r.total}" for r in rows)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "memd.cli.hugepages_admin", mod)
    return calls


def test_hugepages_show_reserve_mount_clear(
    fake_admin: list[tuple[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert memctl.main(["hugepages"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "2097152 0 512"
    assert memctl.main(["--json", "hugepages"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {
        "page_size": 2 << 20,
        "node": 0,
        "total": 512,
        "free": 500,
        "mounts": ["/dev/hugepages"],
    }
    assert memctl.main(["hugepages", "--reserve", "1G", "--node", "0"]) == 0
    assert fake_admin[-1] == ("reserve", {"size": "1G", "node": 0})
    assert "nr_hugepages 0 -> 512 (2 MiB pages on node 0)" in capsys.readouterr().out
    assert memctl.main(["hugepages", "--reserve", "64M", "--page-size", "2M"]) == 0
    assert fake_admin[-1] == ("reserve", {"size": "64M", "node": None, "page_size": "2M"})
    assert memctl.main(["hugepages", "--mount", "/mnt/huge"]) == 0
    assert fake_admin[-1] == ("mount", ("/mnt/huge", {}))
    assert memctl.main(["hugepages", "--clear"]) == 0
    assert fake_admin[-1] == ("clear", None)
    capsys.readouterr()
    assert memctl.main(["hugepages", "--node", "1"]) == 2  # --node needs --reserve


def test_hugepages_show_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("memd.cli.hugepages_admin") is None:
        code = memctl.main(["hugepages"])
        _, err = capsys.readouterr()
        assert code == 1 and len(err.splitlines()) == 1
        return
    code = memctl.main(["--json", "hugepages"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert isinstance(json.loads(out), list)


# -- against the real daemon ------------------------------------------------------------------

HOLD_ATTACHED = """
import sys
import memd_client as mc
mem = mc.attach(sys.argv[1], runtime_dir=sys.argv[2], timeout=10)
mem.memzone_reserve("held_zone", 3 << 20)
print("ATTACHED", flush=True)
sys.stdin.readline()
mem.detach()
"""


def test_memctl_against_the_daemon(
    rundir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = Daemon(tmp_path, "nohuge", "-m", "8", runtime_dir=Path(rundir)).start()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_ATTACHED, d.prefix, rundir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ATTACHED\n"
        code, out, _ = run(capsys, rundir, "status", prefix=d.prefix)
        assert code == 0, out
        version = re.escape(memd.__version__)
        assert re.search(rf"^daemon\s+memd {version}, pid {d.pid}$", out, re.M)
        assert re.search(r"^processes\s+2 \(1 primary, 1 secondary\)$", out, re.M)
        code, out, _ = run(capsys, rundir, "--json", "processes", prefix=d.prefix)
        procs = json.loads(out)
        assert {(p["pid"], p["role"]) for p in procs} == {
            (d.pid, "primary"),
            (holder.pid, "secondary"),
        }
        code, out, _ = run(capsys, rundir, "memzones", prefix=d.prefix)
        assert code == 0 and "held_zone" in out and "3 MiB" in out
        code, out, _ = run(capsys, rundir, "--json", "memsegs", prefix=d.prefix)
        segs = json.loads(out)
        assert code == 0 and sum(s["length"] for s in segs) >= 8 << 20
        for command in ("heaps", "rings", "mempools"):
            code, out, err = run(capsys, rundir, command, prefix=d.prefix)
            assert code == 0 and err == "" and out
        code, out, _ = run(capsys, rundir, "metrics", prefix=d.prefix)
        assert code == 0 and "\nmemd_up 1\n" in out
        assert 'memd_processes{role="secondary"} 1' in out
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=60)
        d.stop()
    code, _, err = run(capsys, rundir, "status", prefix=d.prefix)
    assert code == 1 and len(err.splitlines()) == 1  # gone: one clear line
    code, out, _ = run(capsys, rundir, "metrics", prefix=d.prefix)
    assert code == 1 and out.splitlines()[-1] == "memd_up 0"  # and a scrape says so
