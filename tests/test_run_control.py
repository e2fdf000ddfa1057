"""simulate's run control: fast --help, no abbreviations, --set checked, Ctrl-C ends every process it started."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed import cli
from fedmed.simulate import INCOMPLETE_MARKER, SimulationError, simulate

REPO = Path(__file__).resolve().parents[1]


def test_parsing_the_command_line_imports_no_torch_nvflare_or_monai():
    script = (
        "import sys, argparse\n"
        "from fedmed import cli\n"
        "cli.build_parser().parse_args(['simulate'])\n"
        "import fedmed.simulate as s\n"
        "p = argparse.ArgumentParser(allow_abbrev=False); s.add_arguments(p)\n"
        "p.parse_args(['--rounds', '2', '--set', 'lr=0.1'])\n"
        "print(sorted(m for m in ('torch', 'nvflare', 'monai') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_abbreviated_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--round", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --round" in capsys.readouterr().err


def test_an_unknown_set_key_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "fedmed", "simulate", "--out", str(out), "--set", "learning_rate=0.1"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1
    assert "unknown key(s) learning_rate" in result.stderr and "valid keys:" in result.stderr and "local_epochs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    bad = subprocess.run([sys.executable, "-m", "fedmed", "simulate", "--out", str(out), "--set", "lr"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr


def test_an_incomplete_output_folder_may_be_reused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "leftover.txt").write_text("from an interrupted run")
    with pytest.raises(SimulationError, match="not empty"):
        simulate(num_sites=2, rounds=1, out=str(out), data=str(tmp_path / "missing.npz"))
    (out / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(Exception, match="missing.npz"):  # gets past the folder check, fails on the data
        simulate(num_sites=2, rounds=1, out=str(out), data=str(tmp_path / "missing.npz"))
    assert not (out / "leftover.txt").exists() and (out / INCOMPLETE_MARKER).exists()


def _processes():
    """{pid: (ppid, session id)} of every process visible in /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def _descendants(pid):
    table, found, frontier = _processes(), set(), {pid}
    while frontier:
        children = {p for p, (ppid, _) in table.items() if ppid in frontier} - found
        found |= children
        frontier = children
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_every_process_and_marks_the_folder_incomplete(tmp_path, sig):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "fedmed", "simulate", "--sites", "2", "--rounds", "20", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:  # wait until the simulator was started
            seen.append(line)
            if line.startswith("[2/3]"):
                break
        assert any(line.startswith("[2/3]") for line in seen), "".join(seen)
        deadline = time.time() + 120  # until the simulator has spawned its site processes
        while time.time() < deadline and len(_descendants(proc.pid)) < 3:
            time.sleep(0.5)
        started = _descendants(proc.pid)
        assert len(started) >= 3, f"expected the simulator and its site processes, found {started}"
        simulator_sessions = {_processes()[pid][1] for pid in started if pid in _processes()}
        os.killpg(proc.pid, sig)  # SIGINT: what Ctrl-C sends to the foreground process group
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert (out / INCOMPLETE_MARKER).is_file()
    time.sleep(1)
    table = _processes()
    left = [pid for pid in started if pid in table] + [pid for pid, (_, sid) in table.items() if sid in simulator_sessions]
    assert left == [], f"processes left behind: {left}"


def test_progress_lines_carry_an_eta_and_setup_milestones():
    from fedmed.simulate import _Progress, _setup_milestone

    progress = _Progress(num_rounds=4, started=0.0)
    # round 1 took 30 s (FLARE starting the sites, data loading): the first estimate uses it
    assert progress.line("round 1/4: 2/2 sites answered; 30.0 s", 40.0).endswith("[40 s elapsed, about 90 s left for training]")
    # later rounds take 5 s: from round 2 on the estimate uses the rounds after the first
    assert progress.line("round 2/4: 2/2 sites answered; 5.0 s", 45.0).endswith("[45 s elapsed, about 10 s left for training]")
    assert progress.line("round 3/4: 2/2 sites answered; 5.0 s", 50.0).endswith("[50 s elapsed, about 5 s left for training]")
    assert progress.line("cross-site: asking 2 sites", 55.0) == "cross-site: asking 2 sites"
    assert _setup_milestone("... - INFO - Initialize ClientRunner for client: site-2") == "site-2 joined the federation"
    assert _setup_milestone("site site-1: 676 training and 170 validation samples from x") == \
        "site-1 loaded 676 training / 170 validation samples"
    assert _setup_milestone("- INFO - set transaction info") is None


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(monkeypatch, capsys):
    import fedmed.simulate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedmed.simulate, "main", interrupted)
    assert cli.main(["simulate"]) == 130
    assert capsys.readouterr().err.strip() == "simulate: interrupted"
