"""The demo in a real browser: headless Chromium (Debian's package, driven by Playwright) uploads a synthetic image
through the chat's file input, submits, and reads the streamed answer, which must be Llama3MM.generate's."""

from __future__ import annotations

import re
import time

import pytest
from PIL import Image
from test_demo import scene_png, serving

from demo.app import ERROR_PREFIX

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (make test installs it); Playwright's own download is unavailable


@pytest.fixture(scope="module")
def demo(tmp_path_factory, single_thread):
    """The demo serving a tiny random model on 127.0.0.1, its files under a temp dir."""
    with serving(tmp_path_factory.mktemp("demo_browser")) as (_, chat, url):
        yield chat, url


def words(text: str) -> list[str]:
    """The letters and digits of a text in order: what survives the chatbot's Markdown rendering unchanged."""
    return re.findall(r"[^\W_]+", text)


def test_browser_uploads_an_image_and_reads_the_streamed_answer(demo, tmp_path):
    """Upload a scene through the textbox's file input, type, press Enter: the user bubble shows the image and the
    bot's answer, once streamed, is generate()'s greedy answer for the adapter's prompt and that image."""
    from playwright.sync_api import sync_playwright

    chat, url = demo
    png = scene_png(tmp_path / "scene.png")
    settings = chat.default_settings()
    assert settings.prompt_format == "completion" and settings.temperature == 0  # the page's defaults for this model
    expected = chat.mm.generate(
        chat.training_prompt("image"),
        images=[Image.open(png).convert("RGB")],
        max_new_tokens=settings.max_new_tokens,
        temperature=0,
    )
    assert words(expected)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator("#chat-input input[type=file]").set_input_files(str(png))
            page.locator("#chat-input textarea").fill("What is in this picture?")
            page.locator("#chat-input textarea").press("Enter")
            bot = page.locator("#chatbot [data-testid=bot]")
            answer, deadline = "", time.monotonic() + 60
            while time.monotonic() < deadline:
                answer = bot.last.inner_text() if bot.count() else ""
                if words(answer) == words(expected):
                    break
                page.wait_for_timeout(100)
            user = page.locator("#chatbot [data-testid=user]")
            assert user.locator("img").count() == 1 and "What is in this picture?" in user.all_inner_texts()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert not answer.startswith(ERROR_PREFIX)
    assert words(answer) == words(expected), f"browser shows {answer!r}; generate() gives {expected!r}"
    shot = tmp_path / "demo.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as image:
        assert image.width >= 800 and image.height >= 600
