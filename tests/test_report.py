"""`cpuvirt report`: one self-contained HTML file, checked as text and, where Debian's chromium is
installed, loaded in headless chromium (no console errors; the sections render; a screenshot is
written beside the report as an artifact)."""
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def cpuvirt(*args):
    return subprocess.run([sys.executable, "-m", "cpuvirt", *map(str, args)], capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    p = cpuvirt("report", "holes", "--modes", "native,trap,full,hw:ept=0", "-o", out, "--bench", "20")
    assert p.returncode == 0, p.stderr
    return out


def test_report_is_one_self_contained_file(report):
    text = report.read_text()
    for section in ("summary", "plots", "sites", "nanobench"):
        assert f'<section id="{section}">' in text
    assert text.count("<svg") == 3                       # events by reason, modelled cycles, timeline
    # nothing fetched: no scripts, stylesheets, images or frames from anywhere else
    assert not re.search(r'<(script|link|img|iframe)\b[^>]*(src|href)=', text)
    assert "WRONG" in text and "hw ept=0" in text          # the holes under trap; the labelled run
    assert "paper: native / BT / VT-x" in text


def test_report_bad_output_path_is_input_error():
    p = cpuvirt("report", "hello", "--modes", "native,hw", "-o", "/nonexistent-dir/r.html")
    assert p.returncode == 2 and b"/nonexistent-dir/r.html" in p.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report):
    shot = report.with_suffix(".png")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="summary"' in dom.stdout and 'id="sites"' in dom.stdout and "<svg" in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE(" not in dom.stderr
    subprocess.run(base + ["--window-size=1280,2000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
