"""`serve`: the live page over loopback, through a plain HTTP client and through headless Chromium."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import pytest
from test_self_forcing import _toy_stream_setup


@pytest.fixture
def live_server(tmp_path):
    from distill.serve import serve
    from students.streaming import load_causal_student

    toy, _ = _toy_stream_setup(tmp_path)
    student = load_causal_student(toy, tmp_path / "sf")
    server = serve(toy, student, host="127.0.0.1", port=0, fps=8, num_chunks=400, seed=3, recache=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.live.close()
    server.shutdown()
    server.server_close()


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_events_carry_chunks_before_and_after_a_switch(live_server):
    url, _ = live_server
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        assert b"EventSource" in r.read()
    events = urllib.request.urlopen(url + "/events", timeout=30)
    assert _post(url + "/start", {"prompt": "a red cat moving left"}) == {"ok": True, "prompt": "a red cat moving left"}
    seen, switched_at = [], None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = events.readline().decode().strip()
        if not line.startswith("data: "):
            continue
        msg = json.loads(line[6:])
        assert "error" not in msg, msg
        seen.append((msg["chunk"], msg["prompt"], len(msg["frames"])))
        if len(seen) == 2 and switched_at is None:
            _post(url + "/switch", {"prompt": "a blue dog"})
            switched_at = msg["chunk"]
        if msg["prompt"] == "a blue dog":
            break
    events.close()
    assert seen[0] == (0, "a red cat moving left", 3)
    after = [c for c, p, _ in seen if p == "a blue dog"]
    assert after and after[0] > switched_at  # the switch takes effect at a later chunk
    assert all(p == "a red cat moving left" for c, p, _ in seen if c <= switched_at)
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url + "/switch", {"prompt": "  "})
    assert e.value.code == 400


def test_serve_binds_loopback_only():
    from distill.config import ServeConfig
    from distill.serve import serve

    with pytest.raises(ValueError, match=r"loopback addresses only"):
        serve(None, None, host="0.0.0.0", port=0, fps=8, num_chunks=1, seed=0, recache=True)
    with pytest.raises(ValueError, match=r"host: '192.168.1.2'; the page serves loopback addresses only"):
        ServeConfig(host="192.168.1.2")


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.browser
def test_the_page_plays_frames_and_switches_the_prompt_in_chromium(live_server):
    """Headless Chromium types a prompt, starts, switches mid-stream; the page's counters show frames arriving
    before and after the switch, the latency of the first chunk, and the image element playing frames."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = live_server
    browser = _chrome()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.1)
        browser.find_element(By.ID, "prompt").send_keys("a red cat moving left")
        browser.find_element(By.ID, "start").click()
        wait.until(lambda b: int(b.find_element(By.ID, "chunks").text) >= 2)
        before = int(browser.find_element(By.ID, "frames").text)
        latency = float(browser.find_element(By.ID, "latency").text)
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("a blue dog")
        browser.find_element(By.ID, "switch").click()
        wait.until(lambda b: b.execute_script("return document.body.dataset.lastPrompt") == "a blue dog")
        after = int(browser.find_element(By.ID, "frames").text)
        src = browser.find_element(By.ID, "view").get_attribute("src")
        log = browser.find_element(By.ID, "log").text
    finally:
        browser.quit()
    assert before >= 6 and after > before
    assert 0 < latency < 5
    assert src.startswith("data:image/png;base64,")
    assert 'chunk 0: 3 frames, "a red cat moving left"' in log and '"a blue dog"' in log
