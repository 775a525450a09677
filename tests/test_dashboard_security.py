"""Another site's page in a real headless Chromium tries to drive the dashboard's control API
and to frame the dashboard; both are refused. The attacker is served from another port on the
same loopback address: same site, other origin, the closest a page can get without the token."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator

import pytest
from dashboard_page import open_page, severe_console_messages, start_site, wait

from http_api import ActionRouter

pytestmark = pytest.mark.browser

ATTACK = """<!doctype html><title>attacker</title>
<iframe name="sink"></iframe>
<form id="form" method="POST" action="{target}" enctype="text/plain" target="sink">
<input name='{{"action":"ai_regime_override","pad":"' value='"}}'>
</form>
<script>
const target = {target_js};
const body = JSON.stringify({{action: 'ai_regime_override'}});
const results = [];
fetch(target, {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}, body}})
  .then(() => results.push('no-cors sent'), (e) => results.push('no-cors failed'))
  .then(() => fetch(target, {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body}}))
  .then(() => results.push('cors answered'), (e) => results.push('cors failed'))
  .finally(() => {{ document.title = results.join(', '); document.getElementById('form').submit(); }});
</script>"""

FRAME = """<!doctype html><title>framer</title><iframe src="{target}" width="600" height="400"></iframe>"""


class Attacker:
    """A second loopback server whose pages are another origin than the dashboard's."""

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path, b"")
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    a = Attacker()
    yield a
    a.stop()


@pytest.fixture
def recording_site():
    calls = []
    site = start_site(router=ActionRouter({"ai_regime_override": lambda body: calls.append(dict(body)) or {}}))
    site.calls = calls
    yield site
    site.server.stop()


def test_another_sites_page_cannot_drive_the_control_api(driver, recording_site, attacker, base_status, caplog):
    caplog.set_level(logging.INFO, logger="http_api")
    target = recording_site.url + "api/action"
    attacker.pages["/attack"] = ATTACK.format(target=target, target_js=json.dumps(target)).encode()

    def refusals():
        return [r.getMessage() for r in caplog.records if r.name == "http_api" and "refused" in r.getMessage()]

    driver.get(attacker.url("/attack"))
    # The no-cors fetch and the form reach the server and are refused; the JSON fetch dies at its preflight.
    wait(driver, lambda d: len(refusals()) >= 3, message=f"refusals seen: {refusals()}")
    assert driver.title == "no-cors sent, cors failed"
    methods = sorted(m.split()[1] for m in refusals())
    assert methods == ["OPTIONS", "POST", "POST"] and all("refused: 403" in m and "origin" in m for m in refusals())
    assert recording_site.calls == []

    # The dashboard's own page, same browser, same action: it goes through.
    open_page(driver, recording_site, base_status)
    answer = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/action', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({action: 'ai_regime_override'})}).then((r) => done(r.status));"
    )
    assert answer == 200 and recording_site.calls == [{"action": "ai_regime_override"}]


def test_another_sites_page_cannot_frame_the_dashboard(driver, site, attacker):
    attacker.pages["/frame"] = FRAME.format(target=site.url).encode()
    site.board.publish({"now": 0})
    severe_console_messages(driver)
    driver.get(attacker.url("/frame"))
    seen: list[str] = []

    def refused(d) -> bool:
        seen.extend(severe_console_messages(d))
        return any("frame-ancestors 'none'" in m or "X-Frame-Options" in m for m in seen)

    wait(driver, refused, message="the dashboard was framed without a refusal")
