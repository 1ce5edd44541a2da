"""Guest authoring and run-time manners, as a user meets them: one-file guests, silent assembler
drops made errors, unwritable outputs, -q, and Ctrl-C."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import cpuvirt

MINE = """# description: a student's first guest
#include "kernel.inc"
main:
    mov eax, 2
    add eax, 3
    CHECK_EQ("arith", eax, 5)
    ret
"""


def test_att_syntax_is_a_build_error_with_its_line(tmp_path):
    src = tmp_path / "att.S"
    src.write_text(MINE.replace("    add eax, 3\n", "    addl $3, %eax\n"))
    p = cpuvirt("build", src)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{src}:5:" in err and "addl $3, %eax" in err and "AT&T" in err


def test_any_instruction_keystone_drops_is_an_error(tmp_path):
    src = tmp_path / "drop.S"
    src.write_text(MINE.replace("    add eax, 3\n", "    add eax, 3\n    frobnicate %ecx\n"))
    p = cpuvirt("run", src)
    assert p.returncode == 2 and f"{src}:6:" in p.stderr.decode()


@pytest.mark.parametrize("mode", ["native", "trap", "full", "hw"])
def test_run_a_source_file_in_every_mode(tmp_path, mode):
    src = tmp_path / "mine.S"
    src.write_text(MINE)
    p = cpuvirt("run", src, "--mode", mode, "-q")
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"PASS arith\n"


def test_build_one_file_to_a_named_image_and_run_it(tmp_path):
    src = tmp_path / "mine.S"
    src.write_text(MINE)
    out = tmp_path / "img" / "k.bin"
    out.parent.mkdir()
    p = cpuvirt("build", src, "-o", out)
    assert p.returncode == 0 and out.read_bytes()[:4] != b"", p.stderr
    assert cpuvirt("run", out, "-q").stdout == b"PASS arith\n"
    p = cpuvirt("build", src)                       # default: beside the source
    assert p.returncode == 0 and (tmp_path / "mine.bin").read_bytes() == out.read_bytes()


def test_para_of_a_file_without_pv_build_is_input_error(tmp_path):
    src = tmp_path / "mine.S"
    src.write_text(MINE)
    p = cpuvirt("run", src, "--mode", "para")
    assert p.returncode == 2 and "no paravirtualized build" in p.stderr.decode()


@pytest.mark.parametrize("target", ["/nonexistent-dir/k.bin", "/proc/version"])
def test_unwritable_build_output_is_input_error(tmp_path, target):
    src = tmp_path / "mine.S"
    src.write_text(MINE)
    p = cpuvirt("build", src, "-o", target)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "internal error" not in err


def test_quiet_still_says_why_a_run_stopped():
    p = cpuvirt("run", "tests/guests/spin.S", "-q", "--max-insns", "100000")
    assert p.returncode == 124
    assert "budget" in p.stderr.decode() and "virtual time" not in p.stderr.decode()
    p = cpuvirt("run", "hello", "-q")
    assert p.returncode == 0 and p.stderr == b""


# Ctrl-C: at several points of long runs, in every mode, the run ends as an outcome (status 130,
# one line, the trace's footer written), never a traceback or a run that goes on.
@pytest.mark.parametrize("mode,guest", [("native", "spin"), ("trap", "spin"), ("full", "spin"), ("hw", "spin"),
                                        ("native", "nanobench"), ("full", "nanobench"), ("para", "nanobench"),
                                        ("hw", "nanobench"), ("trap", "nanobench")])
def test_ctrl_c_ends_the_run_cleanly(tmp_path, mode, guest):
    path = "tests/guests/spin.S" if guest == "spin" else guest
    for delay in (0.0, 0.6):
        trace = tmp_path / f"{delay}.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "cpuvirt", "run", path, "--mode", mode, "--max-insns", "0",
                                 "--trace", trace], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not trace.exists() and time.monotonic() < deadline:   # the run has begun: the trace is open
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{mode} {guest}: still running 30 s after Ctrl-C")
        text = err.decode()
        assert "Traceback" not in text and "Exception ignored" not in text, text
        footer = json.loads(trace.read_text().splitlines()[-1])
        if guest == "nanobench" and footer["outcome"] == "exit":
            # it finished before the signal came: a Ctrl-C while the summary prints still ends cleanly
            assert proc.returncode in (0, 130), text
            continue
        assert proc.returncode == 130, text
        assert "interrupted" in text.splitlines()[0]
        assert footer["type"] == "footer" and footer["outcome"] == "interrupted" and footer["status"] == 130


def test_an_installed_package_carries_its_guests(tmp_path):
    """A plain (non-editable) install has no checkout beside it: the guests travel in the package."""
    import shutil
    from pathlib import Path
    import cpuvirt.engine
    repo = Path(__file__).resolve().parents[1]
    lib = tmp_path / "lib"
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=repo,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for so in Path(cpuvirt.engine.__file__).parent.glob("_vclock*.so"):
        shutil.copy(so, lib / "cpuvirt" / "engine")
    env = {"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "cpuvirt", *a], cwd=tmp_path, env=env,
                                    capture_output=True, timeout=120)
    p = run("guests")
    assert p.returncode == 0 and str(lib / "cpuvirt" / "_guests") in p.stderr.decode()
    assert b"hello " in p.stdout and b"paging " in p.stdout
    p = run("run", "hello", "-q")
    assert p.returncode == 0 and b"PASS hello" in p.stdout


def test_a_ctrl_c_as_the_run_ends_does_not_hang_the_watcher():
    """The signal's wakeup byte and the run's end byte can arrive in one read: the watcher must still go."""
    import os
    import threading

    from cpuvirt.runner import SigintStop

    class Vcpu:
        stops = []

        def finish(self, *why):
            self.stops.append(why)

    stop = SigintStop()
    stop.attach(Vcpu())
    r, w = os.pipe()
    os.write(w, bytes([signal.SIGINT]) + b"\xff")
    watcher = threading.Thread(target=stop._watch, args=(r,), daemon=True)
    watcher.start()
    watcher.join(timeout=5)
    alive = watcher.is_alive()
    os.close(w)  # lets a stuck watcher go
    watcher.join(timeout=5)
    os.close(r)
    assert not alive, "the watcher still waits after the run's end byte"
