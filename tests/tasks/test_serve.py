"""task=serve: the monitor page and its JSON API, on recordings of the sample replayed into growing files;
the page in a real browser (headless Chromium through Selenium) where one is installed (CI installs it)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gcode_exp.data.read import text_rows
from tests.conftest import ROOT, SAMPLE, default_run_and_two_programs

pytestmark = pytest.mark.slow
SERVING = re.compile(r"serve: (\d+) machine\(s\) on (http://127\.0\.0\.1:\d+/)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    return default_run_and_two_programs(tmp_path_factory.mktemp("serve"))


class Growing:
    """A recording of the sample written into `path` as a logger writes it: the header, then rows appended in
    steps (`to`), so that a test can look at the monitor after each step."""

    def __init__(self, name: str, path: Path):
        self.rows = text_rows(SAMPLE / f"{name}_aligned.csv.gz")
        self.path, self.written = path, 1
        path.write_text(self.rows[0])

    def to(self, share: float) -> int:
        """Append rows up to `share` of the recording; the number of rows written."""
        end = 1 + round(share * (len(self.rows) - 1))
        with open(self.path, "a") as f:
            f.write("".join(self.rows[self.written : end]))
        self.written = max(self.written, end)
        return self.written - 1


class Server:
    """`python run.py task=serve ...` in a subprocess on a free loopback port; stopped with SIGINT."""

    def __init__(self, trained: dict, out: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, str(ROOT / "run.py"), "task=serve", f"ckpt_path={trained['ckpt']}",
               f"data.cache_dir={trained['cache']}", "hardware.threads=1", "serve.port=0", "predict.poll_s=0.1",
               f"hydra.run.dir={out}", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        first = self.proc.stdout.readline()
        match = SERVING.search(first)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no address printed: {first!r} {self.proc.stderr.read()[-2000:]}")
        self.url = match.group(2)

    def get(self, route: str, token: str | None = None, data: bytes | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + route, data=data, headers=headers),
                                    timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


def wait_for(check, timeout: float = 90, every: float = 0.3, shown=None):
    """check()'s first truthy answer within `timeout` seconds; else fail, with `shown()` (what was seen)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {check.__doc__ or check}; {shown() if shown else ''}")


def test_api_follows_two_machines_names_their_programs_and_asks_for_the_token(trained, tmp_path):
    """Two machines written to at once; the token from the environment guards every route and stays out of
    the run folder; each state names the program and moves through its listing; /predict takes a file."""
    token = "s3cret-monitor-token"
    mills = {"mill1": Growing("face_003", tmp_path / "mill1.csv"),
             "mill2": Growing("adaptive_017", tmp_path / "mill2.csv")}
    out = tmp_path / "serve"
    server = Server(trained, out, f"serve.machines=[{mills['mill1'].path},{mills['mill2'].path}]",
                    env={"GCODE_EXP_SERVE_TOKEN": token})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            server.get("machines")
        assert refused.value.code == 401
        assert {m["id"] for m in server.get("machines", token)} == set(mills)
        programs = server.get("programs", token)
        assert {"face", "adaptive"} <= set(programs) and all(programs.values())
        places: dict[str, set[int]] = {k: set() for k in mills}
        for share in (0.4, 0.7, 1.0):
            for key, mill in mills.items():
                rows = mill.to(share)
                state = wait_for(lambda k=key, n=rows: (s := server.get(f"machines/{k}/state", token))["rows"] == n
                                 and s, shown=lambda k=key: server.get(f"machines/{k}/state", token)["rows"])
                places[key].add(state["listing_at"])
        states = {k: server.get(f"machines/{k}/state", token) for k in mills}
        assert (states["mill1"]["locked"], states["mill2"]["program"]) == ("face", "adaptive")
        # the current line found in the listing, and moving on through the adaptive job's many lines (a face job
        # is three long lines)
        assert places["mill1"] - {-1} and len(places["mill2"] - {-1}) >= 2, places
        face = states["mill1"]
        assert face["confidence"] and face["path"] and face["true_path"] and face["jobs"][0]["program"] == "face"
        assert not [a for a in face["alerts"] if "stopped" in a]
        with gzip.open(SAMPLE / "pocket_016_aligned.csv.gz", "rb") as f:
            answer = server.get("predict", token, data=gzip.compress(f.read()))
        assert answer["program"] == "pocket" and answer["rows"] > 0 and answer["lines"][0]["row"] == 0
        with pytest.raises(urllib.error.HTTPError) as bad:
            server.get("predict", token, data=b"not,a,recording\n1,2,3\n")
        assert bad.value.code == 422 and "the posted recording: no sensor columns" in bad.value.read().decode()
    finally:
        code, stdout, stderr = server.stop()
    assert code == 0, stderr[-2000:]
    assert "serve: stopped after" in stdout and re.search(r"mill1: \d+ rows, program face \(locked\)", stdout)
    assert re.search(r"mill2: \d+ rows, (program adaptive \(locked\)|last named adaptive \(p )", stdout), stdout
    assert json.loads((out / "metrics.json").read_text())["serve/machines"][0]["locked"] == "face"
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert token not in written and token not in stdout + stderr


def browser():
    """Headless Chromium, or a skip where none is installed (CI installs Debian's chromium and its driver, and
    sets GCODE_EXP_BROWSER=required so that a missing one fails instead)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (chromium and shutil.which("chromedriver")):
        if os.environ.get("GCODE_EXP_BROWSER") == "required":
            pytest.fail("GCODE_EXP_BROWSER=required but chromium or chromedriver is not on PATH")
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))


def test_the_page_in_a_browser_shows_the_program_moves_the_line_and_raises_a_stopped_alert(trained, tmp_path):
    driver = browser()
    from selenium.webdriver.common.by import By

    mill = Growing("damagepocket_002", tmp_path / "mill.csv")
    server = Server(trained, tmp_path / "serve", f"data.path={mill.path}", "serve.stopped_s=3")
    try:
        driver.get(server.url)
        card = '.machine[data-machine="mill"]'

        def text(selector: str) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, f"{card} {selector}")
            return found[0].text if found else ""

        def current() -> int:
            """the highlighted line's place in the listing (-1: none)"""
            return driver.execute_script(
                f"const li = document.querySelector('{card} .listing li.current');"
                "return li ? [...li.parentNode.children].indexOf(li) : -1;")

        places = []
        for share in (0.3, 0.5, 0.7, 1.0):
            rows = mill.to(share)
            wait_for(lambda n=rows: text(".rows").startswith(f"{n} rows"), shown=lambda: text(".rows"))
            assert "stream stopped" not in text(".alerts")
            places.append(current())
        assert "program damagepocket" in text(".program")
        assert len(set(places) - {-1}) >= 3, places  # the highlighted line moved on with the job
        wait_for(lambda: "stream stopped" in text(".alerts"), timeout=30, shown=lambda: text(".alerts"))
        shot = Path(os.environ.get("GCODE_EXP_SCREENSHOT", tmp_path / "monitor.png"))
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
        code, _, stderr = server.stop()
    assert code == 0, stderr[-2000:]
