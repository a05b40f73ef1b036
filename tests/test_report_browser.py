"""The report in a real headless Chromium: it loads without console messages, shows every query, and screenshots."""

from __future__ import annotations

import struct

import pytest

from pretrace.report import find_chromium, load_page, screenshot, write_report
from test_report_html import fake_rows, parse

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(find_chromium() is None, reason="no Chromium found (Debian: apt-get install -y chromium); "
                                                       "or set PRETRACE_CHROMIUM to an executable"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    return write_report(fake_rows(), folder / "report.html", run_info={"method": "ekfac"})


def test_console_messages_are_caught(tmp_path):
    """Control: the check below could fail, because a page with a script error does produce messages."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><p>x</p><script>console.error("boom"); missingFunction();</script>')
    console = load_page(page).console
    assert any("boom" in message for message in console)
    assert any("missingFunction is not defined" in message for message in console)


def test_report_loads_cleanly_and_shows_every_query(report):
    loaded = load_page(report)
    assert loaded.console == []
    dom = parse(loaded.dom)
    tags = [tag for tag, _ in dom.elements]
    assert "script" not in tags  # the hostile document stayed text; the only images are the embedded plots
    images = [attrs for tag, attrs in dom.elements if tag == "img"]
    assert len(images) == 2 and all(attrs["src"].startswith("data:image/png;base64,") and "onerror" not in attrs for attrs in images)
    sections = [attrs["id"] for tag, attrs in dom.elements if tag == "section" and attrs.get("class") == "query"]
    links = [attrs["href"] for tag, attrs in dom.elements if tag == "a" and attrs.get("class") is None and attrs["href"] != "#summary"]
    assert sections == ["q1", "q2", "q3"] and links == [link for section in sections for link in (f"#{section}", f"#{section}-d1")]
    text = "".join(dom.text)
    for row in fake_rows():
        assert row["query_id"] in text and row["prompt"] in text
    assert tags.count("li") == sum(len(row["documents"]) for row in fake_rows())
    assert tags.count("svg") == tags.count("li")


def test_screenshot_is_a_png_of_the_requested_size(report, tmp_path):
    path = screenshot(report, tmp_path / "shot.png", width=800, height=600)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (800, 600)
    assert [p.name for p in tmp_path.iterdir()] == ["shot.png"]
