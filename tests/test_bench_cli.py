"""``leantrain bench``: every script in benchmarks/ is listed with a description, a missing checkout is one line,
and Ctrl-C stops a benchmark with one line and exit code 130 (no traceback from the child)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leantrain.cli import main
from leantrain.commands import bench

ROOT = Path(__file__).resolve().parents[1]


def test_the_list_covers_every_script_in_benchmarks():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
    assert set(bench.BENCHMARKS) == scripts
    assert set(bench.DEFAULT) <= scripts


def test_list_names_every_benchmark_with_a_one_line_description(capsys):
    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    described = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert set(described) == {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert all(len(text) > 20 and text.endswith(".") for text in described.values())


def test_without_a_source_checkout_bench_refuses_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: None)
    assert main(["bench", "--list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source checkout" in err[0]


# Ctrl-C's usual disposition, as a terminal's foreground job has it: a test session started in the background
# (`make test &`, nohup) ignores SIGINT, its children inherit that, and Python then never raises KeyboardInterrupt.
CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from leantrain.commands import bench
from leantrain.cli import main
bench.benchmarks_dir = lambda: Path({folder!r})
bench.BENCHMARKS = ("slow",)
sys.exit(main(["bench", "slow", "--out", {out!r}]))
"""
SLOW = '''"""Sleeps until stopped."""
import os, sys, time
open(sys.argv[sys.argv.index("--json") + 1] + ".pid", "w").write(str(os.getpid()))
print("started", flush=True)
time.sleep(120)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pid_in(folder: Path) -> int | None:
    path = folder / "out" / "slow.json.pid"
    return int(path.read_text()) if path.exists() else None


def _where(pid: int | None) -> str:
    """A process's state, pending/blocked/caught signals and kernel wait channel, for a failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except (OSError, TypeError):
        return f"pid {pid}: gone"
    keep = [line.replace("\t", " ") for line in status if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk",
                                                                           "SigCgt", "Threads"))]
    return f"pid {pid}: {'; '.join(keep)}; wchan {wchan}"


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_during_a_benchmark_is_one_line_and_exit_130(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    code = CHILD.format(folder=str(tmp_path), out=str(tmp_path / "out"))
    # Its own process group, like a shell job: Ctrl-C in a terminal sends SIGINT to the whole foreground group.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        while (line := proc.stdout.readline()) and line.strip() != "started":
            pass
        assert line.strip() == "started", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where each process was (how the ignored-SIGINT cause was found)
            pytest.fail(f"no exit 60 s after Ctrl-C: {_where(proc.pid)}; benchmark {_where(_pid_in(tmp_path))}")
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["leantrain: interrupted"]
    pid = int((tmp_path / "out" / "slow.json.pid").read_text())
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


LATE_INTERRUPT = """
import os, signal, subprocess, time
class LateInterrupt(subprocess.Popen):
    # Ctrl-C after the fork, before Popen returns: the moment that lost the child's handle.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        print("child", self.pid, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
subprocess.Popen = LateInterrupt
"""


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_while_the_benchmark_is_starting_still_stops_it(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    code = LATE_INTERRUPT + CHILD.format(folder=str(tmp_path), out=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["leantrain: interrupted"]
    pid = int(next(line for line in proc.stdout.splitlines() if line.startswith("child")).split()[1])
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
