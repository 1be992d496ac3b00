"""The comparison app in a real browser (Debian's Chromium, driven by Playwright) on the real SmolLM2.

The original SmolLM2-135M-Instruct and a copy with layers 13-18 removed stream side by side; the
page must show both answers growing at the same time, positive figures, and the removed layers.
Screenshots go to artifacts/ (git-ignored).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
REMOVED = [13, 14, 15, 16, 17, 18]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver"),
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app over the real SmolLM2 and its 24-layer copy, served on 127.0.0.1."""
    from hubprune import LayerPruner
    from hubprune.loading import DEFAULT_MODEL
    from hubprune.space.app import build_app
    from hubprune.space.backends import InProcessBackend
    from hubprune.space.launch import free_port

    folder = tmp_path_factory.mktemp("browser")
    pruner = LayerPruner.from_pretrained(device="cpu")
    pruner.prune(layers=REMOVED).save_pretrained(folder / "smollm2-24l", plot=False)
    del pruner
    backends = [InProcessBackend(DEFAULT_MODEL, name="SmolLM2-135M-Instruct", device="cpu"),
                InProcessBackend(folder / "smollm2-24l", device="cpu")]
    demo = build_app(backends, votes_path=folder / "votes.jsonl", shuffle_seed=1)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, folder / "votes.jsonl"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(app_url[0])
        page.wait_for_selector("#prompt textarea", timeout=60_000)
        yield page
        browser.close()


def _send(page, prompt: str) -> list[tuple[str, str, str]]:
    """Type ``prompt``, send it, and record (answer A, answer B, status) until the round is done."""
    page.fill("#prompt textarea", prompt)
    page.click("#send")
    snapshots, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        snap = tuple(page.inner_text(s).strip() for s in ("#answer-0", "#answer-1", "#status"))
        snapshots.append(snap)
        if snap[2].startswith("Done"):
            return snapshots
        time.sleep(0.05)
    raise AssertionError(f"the round did not finish; last: {snapshots[-1]}")


def _figure(page, panel: int, name: str) -> float:
    return float(page.get_attribute(f"#stats-{panel} [data-fig={name}]", "data-value"))


def test_both_panels_stream_real_models_with_figures_and_the_layer_map(page):
    page.click("text=Sampling (shared by all panels)")
    for selector, value in (("#temperature", "0"), ("#max-tokens", "48")):
        box = page.locator(f"{selector} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.click("text=Sampling (shared by all panels)")  # fold it again
    snapshots = _send(page, "What is the capital of France?")

    streaming = [s for s in snapshots if s[2].startswith("Streaming")]
    assert any(a and b for a, b, _ in streaming), "the two answers never grew at the same time"
    assert len({a for a, _, _ in streaming}) > 2 and len({b for _, b, _ in streaming}) > 2, "no streaming seen"
    original, pruned, status = snapshots[-1]
    assert status == "Done."
    assert "Paris" in original  # SmolLM2's greedy answer
    assert pruned
    for panel in (0, 1):
        for name in ("ttft", "tps", "total", "tokens", "params"):
            assert _figure(page, panel, name) > 0, (panel, name)
        assert "RSS" in page.inner_text(f"#stats-{panel} [data-fig=memory]")
    assert _figure(page, 0, "layers") == 30 and _figure(page, 1, "layers") == 24
    assert _figure(page, 1, "params") < _figure(page, 0, "params")
    assert page.locator("#layers-0 .layer").count() == 30 and page.locator("#layers-0 .layer.removed").count() == 0
    removed = [int(e.get_attribute("data-layer")) for e in page.locator("#layers-1 .layer.removed").all()]
    assert removed == REMOVED
    assert "removed layers 13-18 of 30" in page.inner_text("#layers-1")
    assert "of words shared" in page.inner_text("#diff")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-compare.png"), full_page=True)


def test_blind_mode_in_the_browser_hides_names_until_a_vote(page, app_url):
    page.check("#blind input[type=checkbox]")
    _send(page, "Name three colours.")
    headings = page.inner_text("#heading-0") + page.inner_text("#heading-1")
    assert "Model A" in headings and "Model B" in headings
    for name in ("SmolLM2-135M-Instruct", "smollm2-24l"):
        assert name not in page.inner_text("#panel-0") + page.inner_text("#panel-1")
    assert page.locator("#layers-0 .layer").count() == 0  # the map would give the pruned model away
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-blind.png"), full_page=True)
    page.click("#vote-a")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Vote recorded')", timeout=30_000)
    revealed = page.inner_text("#heading-0") + page.inner_text("#heading-1")
    assert "SmolLM2-135M-Instruct" in revealed and "smollm2-24l" in revealed
    assert page.locator("#layers-0 .layer").count() == 30
    assert page.is_disabled("#vote-b")
    assert app_url[1].read_text().count("\n") == 1
