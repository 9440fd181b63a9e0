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


def test_a_retrieve_stage_is_a_card_that_says_what_it_did(tiny_model_dir, tmp_path, browser) -> None:
    import json

    from slmstack.retrieval import build_index
    from slmstack.serving.server import load_stacks
    from slmstack.serving.settings import ServeSettings
    from tests.conftest import write_yaml
    from tests.unit.serving.conftest import free_port, start_server

    # Prepare: a server whose stack retrieves two passages, then answers
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a red apple is a fruit", "the sky is blue"]))
    build_index(corpus, tmp_path / "index", show_progress=False)
    stack = {"name": "rag", "model": str(tiny_model_dir), "stages": [
        {"name": "facts", "kind": "retrieve", "index": str(tmp_path / "index"), "k": 2, "template": "{input}"},
        {"name": "answer", "template": "{facts}\n{input}", "generation": {"max_new_tokens": 4}}]}  # fmt: skip
    settings = ServeSettings(port=free_port(), max_tokens=16)
    server, thread, _ = start_server(load_stacks([str(write_yaml(tmp_path / "rag.yaml", stack))], []), settings)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{settings.port}/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 1")
        page.fill("#question", "what colour is a red apple?")
        page.click("#send")
        page.wait_for_selector("text=Done in", timeout=60_000)
        # Assert: the retrieve card shows its passages and says no model ran; its details hold the query
        first = page.locator(".card.done").first
        assert first.locator(".name").inner_text() == "facts"
        assert "a red apple is a fruit" in first.locator(".output").inner_text()
        assert (
            "1 passage retrieved (no model)" in first.locator(".meta").inner_text()
        )  # "the sky is blue": no shared word
        assert first.locator("summary").inner_text() == "query"
        page.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
