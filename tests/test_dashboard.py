"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against `cgw run`.

Devices publish to a real Mosquitto; the page must show them, take live alarms, presence changes
and requests from the stream, acknowledge an alarm, draw a chart, switch language, and never
reach beyond the gateway (the box may have no internet). Screenshots of every view are kept in
test-artifacts/dashboard/ (docs/testing.md).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.harness import mosquitto_pub
from tests.services import GatewayProcess, MosquittoProcess, wait_for

pytestmark = pytest.mark.integration

DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")  # the page's one date format
OPERATOR = "dash-operator"
VIEWER = "dash-viewer"
ARTIFACTS = (
    Path(os.environ.get("CGW_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "dashboard"
)
CHROMIUM_FLAGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        raise RuntimeError("chromium is not installed: run `scripts/dev test`, which installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def community(tmp_path: Path) -> Iterator[tuple[MosquittoProcess, GatewayProcess]]:
    broker = MosquittoProcess(tmp_path / "broker")
    broker.start()
    gateway = GatewayProcess(
        tmp_path / "gateway",
        {
            "CGW_COMMUNITY": "riverside",
            "CGW_MQTT__URL": broker.url,
            "CGW_AUTH__TOKENS": orjson.dumps({OPERATOR: "operator", VIEWER: "viewer"}).decode(),
        },
    )
    gateway.start()
    try:
        wait_for(lambda: _api(gateway, "/readyz").get("ready"), 30, "the gateway to be ready")
        _devices(broker, gateway)
        yield broker, gateway
    finally:
        gateway.stop()
        broker.stop()


def _api(gateway: GatewayProcess, path: str, token: str = VIEWER) -> dict:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{gateway.url}{path}", headers=headers, timeout=5).json()  # type: ignore[no-any-return]


def _devices(broker: MosquittoProcess, gateway: GatewayProcess) -> None:
    """Two buildings of sensors and a terminal, with some telemetry and one request."""
    port = broker.port
    for building in ("1", "2"):
        for floor in (1, 2, 3):
            device = f"b{building}-f{floor}-aq"
            birth = {
                "state": "online",
                "kind": "air_quality",
                "location": {"building": building, "floor": floor},
            }
            mosquitto_pub(port, f"cgw/v1/{device}/status", orjson.dumps(birth), "-r")
    birth = {"state": "online", "kind": "service_terminal", "location": {"building": "station"}}
    mosquitto_pub(port, "cgw/v1/term-1/status", orjson.dumps(birth), "-r")
    now = int(time.time() * 1000)
    for i in range(5):
        reading = {"ts": now - (5 - i) * 60_000, "metrics": {"pm25": 10.0 + i * 5, "temp_c": 21.0}}
        mosquitto_pub(port, "cgw/v1/b1-f1-aq/telemetry", orjson.dumps(reading))
    wait_for(lambda: _api(gateway, "/api/v1/summary").get("devices") == 7, 20, "seven devices")


def _open(
    browser: Browser, gateway: GatewayProcess, token: str = OPERATOR, fragment: str = ""
) -> tuple[Page, list[str]]:
    """A fresh page signed in through the link `cgw demo` prints; also returns every URL it asked for."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(f"{gateway.url}/dashboard/#token={token}{fragment}")
    return page, asked


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_every_view_loads_in_chinese_and_english_without_internet(
    browser: Browser, community: tuple[MosquittoProcess, GatewayProcess]
) -> None:
    broker, gateway = community
    # A request with a lifecycle, so the board, the heat map and the needs list have something.
    request = {
        "request_id": "r1",
        "service_code": "repair.plumbing",
        "description": "漏水",
        "location": {"building": "2", "unit": "2-101"},
    }
    mosquitto_pub(broker.port, "cgw/v1/term-1/request", orjson.dumps(request))
    wait_for(lambda: _api(gateway, "/api/v1/requests")["items"], 20, "the request")

    page, asked = _open(browser, gateway)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The page's content security policy refuses inline script and style attributes: nothing on
    # it may need them (Chromium reports each refusal on the console).
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    expect(page.locator("#community")).to_have_text("riverside")
    expect(page.locator("nav button[data-tab=overview]")).to_have_text("社区概览")
    expect(page.locator(".building")).to_have_count(3)  # buildings 1 and 2, and the station
    expect(page.locator(".dev[data-state=online]")).to_have_count(7)
    expect(page.locator("#card-devices .n")).to_have_text("7")
    expect(page.locator("#live")).to_have_attribute("data-state", "online")
    _shot(page, "overview-zh")

    page.click("nav button[data-tab=telemetry]")
    page.select_option("#tm-device", "b1-f1-aq")
    page.select_option("#tm-metric", "pm25")
    expect(page.locator("#chart")).to_have_attribute("data-points", "5")
    expect(page.locator("#chart canvas")).to_have_count(1)
    # The chart's time is the page's one date format (not uPlot's US month/day and am/pm).
    page.hover("#chart .u-over")
    expect(page.locator("#chart .u-legend .u-series").first.locator(".u-value")).to_have_text(DATE_TIME)
    _shot(page, "telemetry-zh")

    page.click("nav button[data-tab=requests]")
    expect(page.locator(".column[data-state=submitted] .ticket")).to_have_count(1)
    expect(page.locator(".column[data-state=submitted] .ticket")).to_contain_text("2 号楼")
    _shot(page, "requests-zh")

    page.click("nav button[data-tab=needs]")
    expect(page.locator("[data-cell='2/repair']")).to_have_text("1")
    shade = page.locator("[data-cell='2/repair']").evaluate("cell => getComputedStyle(cell).backgroundColor")
    assert shade.startswith("rgba(220, 38, 38"), shade  # set as a style property, which the policy allows
    expect(page.locator("#needs-rows tr")).to_have_count(1)
    expect(page.locator("#needs-rows tr td").last).to_contain_text("1 户")
    assert page.url.endswith("/dashboard/#view=needs&lang=zh")  # the view can be linked to
    _shot(page, "needs-zh")

    page.click("nav button[data-tab=evaluation]")
    expect(page.locator("#eval-service tr")).to_have_count(1)
    _shot(page, "evaluation-zh")

    page.click("#lang")
    expect(page.locator("nav button[data-tab=overview]")).to_have_text("Overview")
    expect(page.locator("#eval-head-service th").first).to_have_text("Service")
    assert page.url.endswith("#view=evaluation&lang=en")
    page.click("nav button[data-tab=needs]")
    # Counted words agree with their number, in English as in Chinese.
    why = page.locator("#needs-rows tr td").last
    expect(why).to_contain_text("1 household, ")
    expect(why).to_have_text(
        re.compile(r"^1 household, \d+ sensor signals?, priority \w+, open \d+\.\d days?$")
    )
    page.click("nav button[data-tab=overview]")
    expect(page.locator(".building h3").first).to_have_text("Building 1")
    _shot(page, "overview-en")
    # The choice of language is remembered, and the address keeps the view and the language.
    page.reload()
    expect(page.locator("nav button[data-tab=overview]")).to_have_text("Overview")

    # A link opens the view and the language it names (and signs in, as `cgw demo`'s does).
    linked, _ = _open(browser, gateway, fragment="&view=needs&lang=en")
    linked.on("pageerror", lambda error: errors.append(str(error)))
    expect(linked.locator("#needs")).to_have_class(re.compile(r"\bactive\b"))
    expect(linked.locator("nav button[data-tab=needs]")).to_have_class(re.compile(r"\bactive\b"))
    expect(linked.locator("nav button[data-tab=needs]")).to_have_text("Needs and hotspots")
    expect(linked.locator("#needs-rows tr")).to_have_count(1)
    assert linked.url.endswith("/dashboard/#view=needs&lang=en")  # the token left the address bar
    # Following another link on the open page switches view and language.
    linked.evaluate("location.hash = 'view=requests&lang=zh'")
    expect(linked.locator("nav button[data-tab=requests]")).to_have_class(re.compile(r"\bactive\b"))
    expect(linked.locator("nav button[data-tab=overview]")).to_have_text("社区概览")
    linked.close()

    host = urlsplit(gateway.url).netloc
    elsewhere = [url for url in asked if urlsplit(url).netloc != host and not url.startswith("data:")]
    assert elsewhere == [], f"the page reached beyond the gateway: {elsewhere}"
    assert errors == []
    # The token lives in the tab's session storage, never in the browser's local storage.
    assert page.evaluate("sessionStorage.getItem('cgw.token')") == OPERATOR
    assert page.evaluate("localStorage.getItem('cgw.token')") is None
    policy = httpx.get(f"{gateway.url}/dashboard/", timeout=5).headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    page.close()


def test_live_alarm_presence_and_request_then_acknowledge(
    browser: Browser, community: tuple[MosquittoProcess, GatewayProcess]
) -> None:
    broker, gateway = community
    page, _ = _open(browser, gateway)
    expect(page.locator("#live")).to_have_attribute("data-state", "online")
    expect(page.locator("#alarm-count")).to_have_text("0")

    # An alarm arrives while the page is open.
    event = {"type": "smoke_alarm", "severity": "critical", "message": "smoke on floor 2"}
    mosquitto_pub(broker.port, "cgw/v1/b2-f2-aq/event", orjson.dumps(event))
    expect(page.locator("#alarm-count")).to_have_text("1")
    expect(page.locator(".dev[data-device=b2-f2-aq]")).to_have_attribute("data-state", "alarm")
    # A device goes offline.
    mosquitto_pub(broker.port, "cgw/v1/b1-f3-aq/status", b'{"state":"offline"}', "-r")
    expect(page.locator(".dev[data-device=b1-f3-aq]")).to_have_attribute("data-state", "offline")
    _shot(page, "overview-live")

    # A request is filed at the terminal: it appears on the board without a reload.
    page.click("nav button[data-tab=requests]")
    request = {
        "request_id": "r2",
        "service_code": "repair.electrical",
        "description": "跳闸",
        "location": {"building": "1", "unit": "1-301"},
    }
    mosquitto_pub(broker.port, "cgw/v1/term-1/request", orjson.dumps(request))
    expect(page.locator(".column[data-state=submitted] .ticket")).to_have_count(1)

    page.click("nav button[data-tab=alarms]")
    row = page.locator("#alarm-rows tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("smoke on floor 2")
    expect(row.locator("td").first).to_have_text(DATE_TIME)  # the same format in both languages
    page.click("#lang")
    expect(row.locator("td").first).to_have_text(DATE_TIME)
    page.click("#lang")
    _shot(page, "alarms-live")
    row.locator("button.ack").click()
    expect(row).to_have_count(0)
    expect(page.locator("#alarm-count")).to_have_text("0")
    alarms = _api(gateway, "/api/v1/events")["items"]
    assert [a["acked"] for a in alarms if a["type"] == "smoke_alarm"] == [True]
    page.close()


def test_a_viewer_cannot_acknowledge_and_a_bad_token_is_asked_again(
    browser: Browser, community: tuple[MosquittoProcess, GatewayProcess]
) -> None:
    broker, gateway = community
    event = {"type": "fault", "severity": "warning", "message": "stuck"}
    mosquitto_pub(broker.port, "cgw/v1/b1-f1-aq/event", orjson.dumps(event))
    wait_for(lambda: _api(gateway, "/api/v1/alarms")["items"], 20, "the alarm")

    page, _ = _open(browser, gateway, VIEWER)
    page.click("nav button[data-tab=alarms]")
    page.locator("#alarm-rows button.ack").click()
    expect(page.locator("#message")).to_contain_text("operator")
    expect(page.locator("#alarm-rows tr")).to_have_count(1)
    page.close()

    page, _ = _open(browser, gateway, "not-a-token")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_have_text("令牌无效或已过期。")
    page.fill("#token", OPERATOR)
    page.click("#login button[type=submit]")
    expect(page.locator(".dev")).to_have_count(7)
    _shot(page, "signed-in")
    page.close()


def test_the_api_docs_are_served_whole_by_the_gateway_under_its_policy(
    browser: Browser, community: tuple[MosquittoProcess, GatewayProcess]
) -> None:
    """/docs shows Swagger UI on a box without internet: every file from the gateway, nothing refused."""
    _, gateway = community
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    asked: list[str] = []
    refused: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda error: refused.append(str(error)))
    page.goto(f"{gateway.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("cgw: community edge gateway")
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/devices").first).to_be_visible()
    _shot(page, "api-docs")
    host = urlsplit(gateway.url).netloc
    elsewhere = [url for url in asked if urlsplit(url).netloc != host and not url.startswith("data:")]
    assert elsewhere == [], f"the docs reached beyond the gateway: {elsewhere}"
    assert refused == []
    html = httpx.get(f"{gateway.url}/docs/", timeout=5)
    assert re.findall(r"(?:src|href)=\"([^\"]+)\"", html.text) == [
        "data:,",
        "/docs/swagger/swagger-ui.css",
        "/docs/swagger/swagger-ui-bundle.js",
        "/docs/start.js",
    ]
    policy = html.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert httpx.get(f"{gateway.url}/redoc", timeout=5).status_code == 404  # not served: it needs elsewhere
    page.close()
