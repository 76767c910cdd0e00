"""End to end in a real browser: `infinitystar demo` on a free local port, driven by headless Chromium.

Text-to-video: type a prompt, press generate, wait for a playable video, download it and decode it (17 frames of
64x64). Interactive: two submits give one longer video. Image-to-video: an unreadable upload is a message. A screenshot of each step is saved as a test artifact
(INFINITYSTAR_TEST_ARTIFACTS, default test-artifacts/ at the repository root).

Needs Chromium and its driver (Debian: `apt-get install -y chromium chromium-driver`) and the Python packages of
the `demo` and `test` extras (`pip install -e ".[demo,test]"`); `.ci/run` installs them. Without them it skips.
"""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from infinitystar.media import load_video

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("INFINITYSTAR_TEST_ARTIFACTS", ROOT / "test-artifacts"))
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
START_TIMEOUT_S = 180       # model load + Gradio start on a busy 2-core machine
GENERATE_TIMEOUT_S = 180    # one 17-frame video takes about a second on 2 free cores
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100")


def _missing() -> list[str]:
    missing = []
    for module, what in (("gradio", "gradio (pip install -e '.[demo]')"),
                         ("selenium", "selenium (pip install -e '.[test]')")):
        try:
            __import__(module)
        except ImportError:
            missing.append(what)
    if BROWSER is None or DRIVER is None:
        missing.append("Chromium and its driver (apt-get install -y chromium chromium-driver)")
    return missing


if _missing():
    pytest.skip(f"the browser test needs {'; '.join(_missing())}", allow_module_level=True)

from selenium import webdriver                                      # noqa: E402  (optional, checked above)
from selenium.webdriver.chrome.service import Service               # noqa: E402
from selenium.common.exceptions import ElementClickInterceptedException   # noqa: E402
from selenium.webdriver.common.by import By                         # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait             # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`infinitystar demo` in a child process; yields its URL once it says it is serving."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")))
    proc = subprocess.Popen([sys.executable, "-m", "infinitystar.cli", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("infinitystar demo on "):
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not started.wait(START_TIMEOUT_S) or proc.poll() is not None:
            pytest.fail(f"the demo did not start within {START_TIMEOUT_S} s:\n{''.join(lines)}")
        banner = next(line for line in lines if line.startswith("infinitystar demo on "))
        assert f"http://127.0.0.1:{port}" in banner and "bound to 127.0.0.1" in banner
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))   # explicit driver: nothing downloaded
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _playable_source(driver, video_id: str, not_this: str = "") -> str:
    """Wait until the result video has a source (other than `not_this`) the browser can play; return its URL."""
    script = (f"const v = document.querySelector('#{video_id} video');"
              "return v && v.readyState >= 2 && v.videoWidth > 0 && !v.error ? v.currentSrc : null;")
    return WebDriverWait(driver, GENERATE_TIMEOUT_S, poll_frequency=0.25).until(
        lambda d: (src := d.execute_script(script)) and src != not_this and src)


def _click(driver, element_id: str) -> None:
    """Click once nothing covers the element any more (the page may still be laying out, a toast may cover it)."""
    def attempt(d):
        try:
            d.find_element(By.ID, element_id).click()
            return True
        except ElementClickInterceptedException:
            return False
    WebDriverWait(driver, 30, poll_frequency=0.25).until(attempt)


def _download(url: str, to: Path):
    with urllib.request.urlopen(url, timeout=30) as response:
        to.write_bytes(response.read())
    return load_video(to)


def _open_tab(driver, tab: str, prompt_id: str):
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, f"tab-{tab}-button"))
    _click(driver, f"tab-{tab}-button")
    return WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{prompt_id} textarea"))


def _screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))


def test_text_to_video_then_interactive_in_chromium(server, browser, tmp_path):
    browser.get(server)
    box = _open_tab(browser, "t2v", "t2v-prompt")
    box.send_keys("a large red circle moving right slowly on a black background")
    _click(browser, "t2v-generate")
    src = _playable_source(browser, "t2v-video")
    WebDriverWait(browser, 30).until(lambda d: "Seed" in d.find_element(By.ID, "t2v-status").text)
    _screenshot(browser, "demo_text_to_video.png")
    frames = _download(src, tmp_path / "t2v.mp4")
    assert frames.shape == (17, 64, 64, 3)

    box = _open_tab(browser, "interactive", "interactive-prompt")
    lengths, src = [], ""
    for prompt in ("a large cyan square moving right slowly on a black background",
                   "a large cyan square moving down slowly on a black background"):
        box.send_keys(prompt)
        _click(browser, "interactive-add")
        src = _playable_source(browser, "interactive-video", not_this=src)
        lengths.append(_download(src, tmp_path / f"interactive{len(lengths)}.mp4").shape[0])
    WebDriverWait(browser, 30).until(lambda d: "2 clip(s)" in d.find_element(By.ID, "interactive-status").text)
    _screenshot(browser, "demo_interactive.png")
    assert lengths == [17, 33]

    # an unreadable upload is a message on the page (the app goes on serving)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    _open_tab(browser, "i2v", "i2v-prompt").send_keys("a large red circle moving right slowly on a black background")
    browser.find_element(By.CSS_SELECTOR, "#i2v-input input[type=file]").send_keys(str(broken))
    _click(browser, "i2v-generate")
    WebDriverWait(browser, 60).until(lambda d: "Error: cannot read image" in d.find_element(By.ID, "i2v-status").text)
