"""The web page at ``/``, driven in headless Chromium (Debian's ``chromium`` package) by Playwright."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("SLMSTACK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed machine without a display or outside network (as root, no GPU).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture()
def browser():
    if CHROMIUM is None:
        if os.environ.get("SLMSTACK_REQUIRE_BROWSER"):
            pytest.fail("no chromium found (apt-get install chromium, or set SLMSTACK_CHROMIUM)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_shows_one_card_per_stage_with_its_timing(live, browser) -> None:
    base, app = live
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(base + "/")
    # the model list comes from /v1/models
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    page.select_option("#model", "tiny-stack")
    page.fill("#question", "name a red fruit")
    page.click("#send")
    page.wait_for_selector("text=Done in", timeout=60_000)
    cards = page.locator(".card.done")
    assert cards.count() == 3
    assert [cards.nth(i).get_attribute("data-stage") or "" for i in range(3)][:2] == ["first", "second"]
    assert page.locator(".card.done .name").all_inner_texts() == ["first", "second", "third"]
    for meta in page.locator(".card.done .meta").all_inner_texts():
        assert " s · " in meta and "tokens in" in meta
    # every asset came from this server: no CDN
    assert requests and all(url.startswith(base) for url in requests)
    page.close()
