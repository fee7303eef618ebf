"""The dashboard in a real browser: headless Chromium (Debian's package, ``make browser``) driven
by playwright against a real fleet (two ``neuron run`` processes with echo models, a gateway with
keys on loopback).

Checked as an operator would see it: the page asks for a key, then renders every node and model
with the numbers ``GET /admin/status`` gives; a load clicked on the page shows the model loading,
then ready; pin, unpin and unload work from the page and an error reads as the admin API's; a
page without an admin key offers no action and cannot act; client-controlled text stays text;
the Content-Security-Policy is never violated. The screenshots in docs/operators.md come from
these tests: ``CORTEX_DOCS_SCREENSHOTS=1`` writes them into docs/ (otherwise into a temp dir).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from cortex.auth import GatewayAuth, KeySet
from cortex.cli.console import human_bytes
from cortex.config import ModelProfile
from cortex.testing.cluster import Fleet, GatewayUnderTest
from cortex.testing.servers import UvicornThread

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CORTEX_CHROMIUM", "/usr/bin/chromium")
# As docs/operators.md says: no sandbox (root in CI), and no background connections (the
# machine's network is closed; Chromium would try Google's hosts at every start).
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "ck-browser-client-key"
ADMIN_KEY = "ck-browser-admin-key"
A = "huggingface:web/echo-a"
B = "huggingface:web/echo-b"
C = "huggingface:web/echo-c"
BIG = "huggingface:web/echo-big"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make venv installs the test extras)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium "
            "(needs root and apt-get; CORTEX_CHROMIUM names another binary)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser context and page that records console errors and page errors."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1440, "height": 900})
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def check_clean(self) -> None:
        assert self.errors == [], self.errors
        csp = [m for m in self.console if "Content Security Policy" in m]
        assert csp == [], csp

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    pages: list[Page] = []

    def make() -> Page:
        pages.append(Page(browser))
        return pages[-1]

    yield make
    for page in pages:
        page.check_clean()
        page.close()


def shot_path(tmp_path: Path, name: str) -> Path:
    if os.environ.get("CORTEX_DOCS_SCREENSHOTS") == "1":
        return ROOT / "docs" / name
    return tmp_path / name


def keys() -> GatewayAuth:
    return GatewayAuth(KeySet.from_keys([API_KEY]), KeySet.from_keys([ADMIN_KEY]), required=True)


def web_fleet(fleet: Fleet, **settings: Any) -> GatewayUnderTest:
    fleet.publish_echo("web/echo-a", reply="alpha", memory_mb=300, load_seconds=2.5)
    fleet.publish_echo(
        "web/echo-b",
        reply="the quick brown fox jumps over the lazy dog " * 3,
        memory_mb=200,
        tokens_per_second=300,
    )
    fleet.publish_echo("web/echo-c", reply="gamma ray", memory_mb=100, tokens_per_second=150)
    fleet.publish_echo("web/echo-big", memory_mb=5000)
    models = [
        ModelProfile(id="web/echo-a", memory_mb=300, keep_alive="30m", nodes=["n1"]),
        ModelProfile(id="web/echo-b", memory_mb=200, pinned=True),
        ModelProfile(id="web/echo-c", memory_mb=100, keep_alive="10m"),
        ModelProfile(id="web/echo-big", memory_mb=5000),
    ]
    aliases = {"alpha": "web/echo-a", "fast": "web/echo-c", "chat": "web/echo-b"}
    return fleet.gateway(models=models, aliases=aliases, **settings)


def admin_status(gw: GatewayUnderTest) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    answer = httpx.get(f"{gw.url}/admin/status", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def client_of(gw: GatewayUnderTest) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=API_KEY, max_retries=0)


def traffic(gw: GatewayUnderTest, rounds: int = 10) -> None:
    """Streams on echo-b and echo-c, a point of the charts after each round."""
    client = client_of(gw)
    series = gw.server.app.state.dashboard.series
    series.step_s = 0.4  # points closer than the default 5 s, so a short test draws a line
    series.sample()
    for i in range(rounds):
        for model in ("chat", "fast")[: 1 + i % 2]:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"hi {i}"}], stream=True
            )
            for _ in stream:
                pass
        time.sleep(0.1)
        series.sample()


def enter_key(page: Any, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-use")


def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def wait_for_the_same_numbers(page: Any, gw: GatewayUnderTest, timeout: float = 30.0) -> None:
    """Until the page shows what /admin/status says (the page polls every second; a fleet poll
    can land between the two reads). On a timeout, says what differed."""
    deadline = time.monotonic() + timeout
    while True:
        shown, expected = page_numbers(page), expected_numbers(admin_status(gw))
        if shown == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the page shows {shown}\n/admin/status says {expected}")
        time.sleep(0.2)


def page_numbers(page: Any) -> dict[str, Any]:
    """What the page shows, read from the DOM (attributes and visible text)."""
    return page.evaluate(
        """() => ({
          nodes: [...document.querySelectorAll('.node')].map(n => ({
            name: n.dataset.node, up: n.dataset.up,
            devices: [...n.querySelectorAll('.device')].map(d => ({
              key: d.dataset.device, used: +d.dataset.used, total: +d.dataset.total,
              queue: +d.dataset.queue, state: d.dataset.state,
              text: d.querySelector('.mem-text').textContent})),
          })),
          models: [...document.querySelectorAll('#models tbody tr')].map(r => ({
            id: r.dataset.model, node: r.dataset.node,
            state: r.querySelector('[data-field=state]').textContent,
            bytes: +r.querySelector('[data-field=memory]').dataset.bytes,
            memory: r.querySelector('[data-field=memory]').textContent,
            running: +r.querySelector('[data-field=batch]').dataset.running,
            waiting: +r.querySelector('[data-field=batch]').dataset.waiting,
            max_batch: +r.querySelector('[data-field=batch]').dataset.maxBatch,
            in_flight: +r.querySelector('[data-field=in_flight]').dataset.value,
            pinned: r.querySelector('[data-field=pinned]').dataset.value === 'true',
          })),
          nodesUp: document.getElementById('nodes-up').textContent,
        })"""
    )


def expected_numbers(status: dict[str, Any]) -> dict[str, Any]:
    up = sum(1 for n in status["nodes"] if n["up"])
    return {
        "nodes": [
            {
                "name": n["name"],
                "up": "true" if n["up"] else "false",
                "devices": [
                    {
                        "key": f"{n['name']}/{d['key']}",
                        "used": d["used_bytes"],
                        "total": d["total_bytes"],
                        "queue": d["queue_depth"],
                        "state": d["state"],
                        "text": f"{human_bytes(d['used_bytes'])} / {human_bytes(d['total_bytes'])}",
                    }
                    for d in n["devices"]
                ],
            }
            for n in status["nodes"]
        ],
        "models": [
            {
                "id": m["id"],
                "node": m["node"],
                "state": m["state"],
                "bytes": m["memory_bytes"],
                "memory": human_bytes(m["memory_bytes"]),
                "running": m["running"],
                "waiting": m["waiting"],
                "max_batch": m["max_batch"],
                "in_flight": m["in_flight"],
                "pinned": m["pinned"],
            }
            for m in sorted(status["models"], key=lambda m: (m["id"], m["node"]))
        ],
        "nodesUp": f"{up}/{len(status['nodes'])} nodes up",
    }


def test_an_admin_sees_the_fleet_and_loads_pins_and_unloads_from_the_page(
    fleet: Fleet, open_page: Any, tmp_path: Path
) -> None:
    gw = web_fleet(fleet, auth=keys(), dashboard="admin")
    httpx.post(
        f"{gw.url}/admin/models/load",
        json={"model": "chat", "node": "n2"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    ).raise_for_status()
    traffic(gw)
    with pytest.raises(openai.NotFoundError):
        client_of(gw).chat.completions.create(
            model="no/such-model", messages=[{"role": "user", "content": "hi"}]
        )

    tab = open_page()
    page = tab.page
    page.goto(f"{gw.url}/ui")
    page.wait_for_selector("#auth-needed:not([hidden])")
    assert "invalid_api_key: missing API key" in page.text_content("#auth-message")
    enter_key(page, ADMIN_KEY)
    page.wait_for_selector(f'#models tr[data-model="{B}"]')
    assert page.get_attribute("#role", "data-can-act") == "true"
    assert page.evaluate("sessionStorage.getItem('cortex.dashboard.key')") == ADMIN_KEY
    assert page.context.cookies() == []

    # the numbers on the page are /admin/status's (the page refreshes every second)
    wait_for_the_same_numbers(page, gw)
    shown = page_numbers(page)
    assert [n["name"] for n in shown["nodes"]] == ["n1", "n2"]
    assert shown["models"][0]["id"] == B and shown["models"][0]["pinned"] is True
    # the catalogue with its aliases, the recent error, the charts
    row = page.locator(f'#catalogue tr[data-catalogue="{A}"]')
    assert row.locator("[data-field=aliases]").text_content() == "alpha"
    assert row.get_attribute("data-state") == "available"
    assert "no/such-model" in page.text_content("#errors tbody")
    assert page.locator(f'#models tr[data-model="{B}"] [data-chart=tokens_per_s] polyline').count()

    # a load from the page: loading, then ready on n1 (the only node web/echo-a may use)
    page.select_option(f'select[data-node-for="{A}"]', "n1")
    page.click(f'#catalogue button[data-action=load][data-model="{A}"]')
    page.wait_for_selector(
        f'#catalogue tr[data-catalogue="{A}"][data-state="loading"], [data-loading="{A}"]',
        timeout=10_000,
    )
    page.wait_for_selector(f'#models tr[data-model="{A}"] .badge.ready', timeout=30_000)
    page.wait_for_selector("#notice[data-kind=ok]")
    assert page.text_content("#notice") == f"loaded {A} on n1"
    assert [m["node"] for m in admin_status(gw)["models"] if m["id"] == A] == ["n1"]
    keep_alive = page.text_content(f'#models tr[data-model="{A}"] [data-field=keep_alive]')
    assert keep_alive.startswith(("29m", "30m")), keep_alive
    traffic(gw, rounds=4)
    wait_for_the_same_numbers(page, gw)
    page.screenshot(path=shot_path(tmp_path, "dashboard.png"), full_page=True)

    # pin and unpin: the admin API's pin, seen in /admin/status
    page.click(f'#models button[data-action=pin][data-model="{A}"]')
    page.wait_for_selector(f'#models tr[data-model="{A}"] [data-field=pinned][data-value=true]')
    assert [m["pinned"] for m in admin_status(gw)["models"] if m["id"] == A] == [True]
    page.click(f'#models button[data-action=unpin][data-model="{A}"]')
    page.wait_for_selector(f'#models tr[data-model="{A}"] [data-field=pinned][data-value=false]')

    # an action the admin API refuses: its error, word for word
    refused = httpx.post(
        f"{gw.url}/admin/models/load",
        json={"model": BIG},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    error = refused.json()["error"]
    page.click(f'#catalogue button[data-action=load][data-model="{BIG}"]')
    page.wait_for_selector("#notice[data-kind=error]")
    notice = page.text_content("#notice")
    assert f"{error['code']}: {error['message']} (HTTP {refused.status_code})" in notice

    # unload takes two clicks
    unload = f'#models button[data-action=unload][data-model="{A}"]'
    page.click(unload)
    assert page.text_content(unload) == "confirm unload"
    assert A in {m["id"] for m in admin_status(gw)["models"]}
    page.click(unload)
    page.wait_for_selector(f'#models tr[data-model="{A}"]', state="detached", timeout=15_000)
    assert A not in {m["id"] for m in admin_status(gw)["models"]}
    assert page.text_content("#notice") == f"unloaded {A} from n1"


def test_without_an_admin_key_the_page_shows_but_cannot_act(
    fleet: Fleet, open_page: Any, tmp_path: Path
) -> None:
    gw = web_fleet(fleet, auth=keys(), dashboard="admin")
    httpx.post(
        f"{gw.url}/admin/models/load",
        json={"model": "fast"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    ).raise_for_status()
    traffic(gw, rounds=6)
    page = open_page().page
    page.goto(f"{gw.url}/ui/")
    page.wait_for_selector("#auth-needed:not([hidden])")
    enter_key(page, "ck-not-a-key")
    # a selector wait, not wait_for_function: that polls by eval, which the page's CSP forbids
    page.wait_for_selector("#auth-message:has-text('refused')")
    enter_key(page, API_KEY)
    page.wait_for_selector(f'#models tr[data-model="{C}"]')
    assert page.get_attribute("#role", "data-can-act") == "false"
    assert page.get_attribute("#role", "data-role") == "client"
    assert page.locator("button[data-action]").count() == 0
    assert page.locator("#catalogue select").count() == 0
    wait_for_the_same_numbers(page, gw)
    page.screenshot(path=shot_path(tmp_path, "dashboard-read-only.png"), full_page=True)

    # the page's own script cannot act either: the admin API refuses a client key and no key
    answers = page.evaluate(
        """async (key) => {
          const send = async (headers) => {
            const r = await fetch('../admin/models/unload', {method: 'POST',
              headers: {'Content-Type': 'application/json', ...headers},
              body: JSON.stringify({model: 'fast'})});
            return [r.status, (await r.json()).error.code];
          };
          return [await send({}), await send({Authorization: 'Bearer ' + key})];
        }""",
        API_KEY,
    )
    assert answers == [[401, "invalid_api_key"], [403, "admin_key_required"]]
    assert sorted(m["id"] for m in admin_status(gw)["models"]) == [B, C]  # still loaded

    # forgetting the key leaves nothing behind
    page.click("#key-forget")
    page.wait_for_selector("#auth-needed:not([hidden])")
    assert page.evaluate("sessionStorage.length") == 0


def test_text_from_clients_is_shown_as_text(fleet: Fleet, open_page: Any) -> None:
    gw = web_fleet(fleet, dashboard="admin")  # no keys: the page opens at once
    hostile = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b>"
    answer = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": hostile, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert answer.status_code == 400  # not a model id (docs/configuration.md#model-ids)
    page = open_page().page
    page.goto(f"{gw.url}/ui/")
    page.wait_for_selector("#errors tbody tr")
    assert hostile in page.text_content("#errors tbody")
    assert page.locator("#errors img, #errors b").count() == 0
    assert page.title() == "cortex fleet"
    assert page.get_attribute("#role", "data-role") == "open"
    assert page.locator("#key-form").is_hidden()  # auth off: no key to type


def test_a_page_on_another_site_cannot_act_on_a_gateway_without_keys(
    fleet: Fleet, open_page: Any
) -> None:
    """Auth off (a laptop on loopback): a page elsewhere that its operator visits posts to the
    admin API through the browser. The gateway refuses what the browser marks as another site's
    (Sec-Fetch-Site), so nothing loads."""
    gw = web_fleet(fleet, dashboard="admin")

    async def elsewhere(_request: Request) -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>another site</title><p>hello</p>")

    other = UvicornThread(Starlette(routes=[Route("/", elsewhere)])).start()
    try:
        page = open_page().page
        page.goto(f"{other.url}/")
        sent = page.evaluate(
            """async (url) => {
              for (const action of ['load', 'pin']) {
                await fetch(url + '/admin/models/' + action, {method: 'POST', mode: 'no-cors',
                  body: JSON.stringify({model: 'fast'})});
              }
              return true;
            }""",
            gw.url,
        )
        assert sent is True
        time.sleep(1.0)
        assert fleet.neuron_models("n1") == {} and fleet.neuron_models("n2") == {}
        assert {p["id"]: p["pinned"] for p in state_of(gw)["profiles"]}[C] is False
    finally:
        other.stop()


def state_of(gw: GatewayUnderTest) -> dict[str, Any]:
    return httpx.get(f"{gw.url}/ui/api/state", timeout=10).json()
