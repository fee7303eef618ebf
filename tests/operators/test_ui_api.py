"""The dashboard's HTTP side (``[gateway] dashboard``, docs/operators.md) against a real
fleet: two ``neuron run`` processes with echo models, gateways on loopback, plain HTTP.

What the browser tests (test_ui_browser.py) cannot see cheaply is checked here: the modes, which
paths need which key, the security headers, the run-time pins and what they do to eviction, the
recent errors and the traffic series.
"""

from __future__ import annotations

import re
import time
from importlib import resources
from typing import Any

import httpx
import openai
import pytest

from cortex.auth import GatewayAuth, KeySet
from cortex.config import ConfigError, ModelProfile, load_cortex_config
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.ui import CSP, STATIC_FILES
from cortex.gateway.ui.series import TrafficSeries
from cortex.testing.cluster import Fleet, GatewayUnderTest

API_KEY = "ck-test-client-key"
ADMIN_KEY = "ck-test-admin-key"


def keys() -> GatewayAuth:
    return GatewayAuth(KeySet.from_keys([API_KEY]), KeySet.from_keys([ADMIN_KEY]), required=True)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def publish(fleet: Fleet) -> list[ModelProfile]:
    fleet.publish_echo("ui/echo-a", reply="alpha says hello", memory_mb=400, tokens_per_second=400)
    fleet.publish_echo("ui/echo-b", reply="beta", memory_mb=400)
    fleet.publish_echo("ui/echo-c", reply="gamma", memory_mb=400)
    fleet.publish_echo("ui/broken", reply="one two three", memory_mb=50, fail_after=0)
    fleet.publish_echo("ui/midfail", reply="one two three four", memory_mb=50, fail_after=2)
    return [
        ModelProfile(id="ui/echo-a", memory_mb=400, keep_alive="10m", nodes=["n1"]),
        ModelProfile(id="ui/echo-b", memory_mb=400, nodes=["n1"]),
        ModelProfile(id="ui/echo-c", memory_mb=400, nodes=["n1"]),
        ModelProfile(id="ui/broken", memory_mb=50),
        ModelProfile(id="ui/midfail", memory_mb=50),
    ]


def state(gw: GatewayUnderTest, key: str | None = None) -> dict[str, Any]:
    answer = httpx.get(f"{gw.url}/ui/api/state", headers=bearer(key) if key else {}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def admin(gw: GatewayUnderTest, action: str, key: str | None = ADMIN_KEY, **body: Any):
    return httpx.post(
        f"{gw.url}/admin/models/{action}",
        json=body,
        headers=bearer(key) if key else {},
        timeout=60,
    )


# ---- config ------------------------------------------------------------------------------------


def test_the_dashboard_is_off_unless_configured(fleet: Fleet, tmp_path) -> None:
    gw = fleet.gateway()
    assert gw.gateway.config.gateway.dashboard == "off"
    for path in ("/ui", "/ui/", "/ui/static/dashboard.js", "/ui/api/state"):
        answer = httpx.get(gw.url + path, timeout=10)
        assert answer.status_code == 404, path
    path = tmp_path / "cortex.toml"
    path.write_text('[gateway]\ndashboard = "on"\n')
    with pytest.raises(ConfigError, match="dashboard"):
        load_cortex_config(path)
    path.write_text('[gateway]\ndashboard = "read-only"\n')
    assert load_cortex_config(path).gateway.dashboard == "read-only"


# ---- keys, headers, files ----------------------------------------------------------------------


def test_the_page_needs_no_key_and_the_data_needs_one(fleet: Fleet) -> None:
    gw = fleet.gateway(auth=keys(), dashboard="admin")
    redirect = httpx.get(f"{gw.url}/ui", timeout=10)
    assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
    page = httpx.get(f"{gw.url}/ui/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # every file the page names is served, without a key, with the strict policy
    named = set(re.findall(r'(?:src|href)="static/([^"]+)"', page.text))
    assert named == set(STATIC_FILES)
    for answer in [page] + [httpx.get(f"{gw.url}/ui/static/{n}", timeout=10) for n in named]:
        assert answer.status_code == 200
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert "set-cookie" not in answer.headers
        assert "access-control-allow-origin" not in answer.headers
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    # the page holds no inline script or style: the policy would block it
    assert "<script>" not in page.text and "style=" not in page.text
    # other names under /ui are not open (no traversal into the package)
    for path in ("/ui/static/../__init__.py", "/ui/static/nope.js", "/ui/api/state"):
        assert httpx.get(gw.url + path, timeout=10).status_code == 401, path
    missing = httpx.get(f"{gw.url}/ui/static/nope.js", headers=bearer(API_KEY), timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    refused = httpx.get(f"{gw.url}/ui/api/state", headers=bearer("ck-wrong"), timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    client = state(gw, API_KEY)["dashboard"]
    assert (client["role"], client["can_act"], client["auth"]) == ("client", False, True)
    boss = state(gw, ADMIN_KEY)["dashboard"]
    assert (boss["role"], boss["can_act"]) == ("admin", True)
    answer = httpx.get(f"{gw.url}/ui/api/state", headers=bearer(API_KEY), timeout=10)
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-security-policy"] == CSP


def test_read_only_mode_offers_no_actions_even_to_an_admin_key(fleet: Fleet) -> None:
    gw = fleet.gateway(auth=keys(), dashboard="read-only")
    seen = state(gw, ADMIN_KEY)["dashboard"]
    assert (seen["mode"], seen["role"], seen["can_act"]) == ("read-only", "admin", False)
    open_gw = fleet.gateway(dashboard="admin")  # no keys: like /admin, open to whoever reaches it
    assert state(open_gw)["dashboard"]["role"] == "open"
    assert state(open_gw)["dashboard"]["can_act"] is True


def test_static_files_ship_in_the_package() -> None:
    folder = resources.files("cortex.gateway.ui") / "static"
    for name in (*STATIC_FILES, "index.html"):
        assert (folder / name).is_file(), name
    script = (folder / "dashboard.js").read_text()
    # data reaches the page as text only
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "document.write" not in script
    assert "document.cookie" not in script and "localStorage" not in script


# ---- the fleet view ----------------------------------------------------------------------------


def test_state_is_the_admin_status_view_plus_catalogue_and_series(fleet: Fleet) -> None:
    gw = fleet.gateway(models=publish(fleet), aliases={"ea": "ui/echo-a"}, dashboard="admin")
    assert admin(gw, "load", key=None, model="ea").status_code == 200
    client = gw.client()
    for _ in range(2):
        list(
            client.chat.completions.create(
                model="ea", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    # the neuron's scheduler counts (running, waiting) arrive with the next poll
    gw.wait_for(lambda: all(m["running"] == 0 for m in state(gw)["status"]["models"]))
    seen = state(gw)
    status = httpx.get(f"{gw.url}/admin/status", timeout=10).json()
    for key in ("nodes", "loads_in_progress", "failed_loads", "events"):
        assert seen["status"][key] == status[key], key
    # models: the same replicas with the same numbers (idle time moves between two reads)
    strip = lambda models: [{k: v for k, v in m.items() if not k.endswith("_s")} for m in models]  # noqa: E731
    assert strip(seen["status"]["models"]) == strip(status["models"])
    (model,) = status["models"]
    assert model["id"] == "huggingface:ui/echo-a" and model["node"] == "n1"
    assert model["max_batch"] >= 1 and model["running"] == 0 and model["waiting"] == 0
    assert model["keep_alive_s"] == 600.0 and 590 <= model["keep_alive_left_s"] <= 600
    (device,) = next(n for n in status["nodes"] if n["name"] == "n1")["devices"]
    assert device["used_bytes"] == 400 * 2**20 and device["total_bytes"] == 1000 * 2**20
    assert device["queue_depth"] == 0 and device["max_queue"] > 0
    entry = next(e for e in seen["catalogue"] if e["id"] == "ea")
    assert entry["alias_for"] == "huggingface:ui/echo-a" and entry["state"] == "ready"
    assert {p["id"] for p in seen["profiles"]} == {
        "huggingface:ui/echo-a",
        "huggingface:ui/echo-b",
        "huggingface:ui/echo-c",
        "huggingface:ui/broken",
        "huggingface:ui/midfail",
    }
    assert seen["health"]["nodes_up"] == 2 and seen["health"]["models_ready"] == 1


def test_recent_errors_name_the_model_the_node_and_the_code(fleet: Fleet) -> None:
    gw = fleet.gateway(models=publish(fleet), dashboard="admin")
    client = gw.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no/such-model", messages=[{"role": "user", "content": "x"}]
        )
    # a neuron fails the generation (the echo model's scripted fault) after the gateway placed it
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(
            model="ui/broken", messages=[{"role": "user", "content": "x"}]
        )
    errors = httpx.get(f"{gw.url}/admin/status", timeout=10).json()["errors"]
    assert [e["model"] for e in errors] == [
        "huggingface:ui/broken",
        "no/such-model",
    ]  # newest first
    broken, unknown = errors
    assert unknown["code"] == "model_not_found" and unknown["status"] == 404
    assert unknown["model"] == "no/such-model" and unknown["node"] == "none"
    assert "not found" in unknown["message"]
    assert broken["model"] == "huggingface:ui/broken" and broken["node"] in ("n1", "n2")
    assert broken["route"] == "/v1/chat/completions" and broken["code"]
    assert state(gw)["status"]["errors"] == errors


def test_a_stream_the_neuron_fails_midway_is_an_error_not_ok(fleet: Fleet) -> None:
    """The neuron fails the generation after two tokens, in-band (its headers went out with a
    200): the request is recorded as failed -- recent errors, the errors metric and the request
    series -- whether relayed as is (chat) or translated (Anthropic messages)."""
    gw = fleet.gateway(models=publish(fleet), dashboard="admin")
    ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True}
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json={"model": "ui/midfail", **ask}, timeout=60
    ) as answer:
        assert answer.status_code == 200
        body = answer.read().decode()
    assert '"error"' in body
    with httpx.stream(
        "POST", f"{gw.url}/v1/messages", json={"model": "ui/midfail", **ask}, timeout=60
    ) as answer:
        assert answer.status_code == 200
        body = answer.read().decode()
    assert "event: error" in body
    errors = httpx.get(f"{gw.url}/admin/status", timeout=10).json()["errors"]
    assert [(e["model"], e["route"]) for e in errors] == [
        ("huggingface:ui/midfail", "/v1/messages"),
        ("huggingface:ui/midfail", "/v1/chat/completions"),
    ]
    assert all(e["code"] and e["code"] != "ok" for e in errors)
    model = "huggingface:ui/midfail"
    assert gw.metric("cortex_requests_total", model=model, status="error") == 2
    assert gw.metric("cortex_requests_total", model=model, status="ok") == 0


# ---- pins --------------------------------------------------------------------------------------


def test_a_pin_from_the_admin_api_stops_eviction_and_an_unpin_allows_it(fleet: Fleet) -> None:
    gw = fleet.gateway(models=publish(fleet), auth=keys(), dashboard="admin")
    assert admin(gw, "load", model="ui/echo-a").status_code == 200
    assert admin(gw, "load", model="ui/echo-b").status_code == 200  # n1 (1000 MB) is now full

    # the same checks and errors as the other admin routes
    assert admin(gw, "pin", key=None, model="ui/echo-a").status_code == 401
    refused = admin(gw, "pin", key=API_KEY, model="ui/echo-a")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    assert admin(gw, "pin").json()["error"]["param"] == "model"
    unknown = admin(gw, "pin", model="no/such-model")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

    answer = admin(gw, "pin", model="ui/echo-a")
    assert answer.json() == {"model": "huggingface:ui/echo-a", "pinned": True, "changed": True}
    assert admin(gw, "pin", model="ui/echo-a").json()["changed"] is False
    assert admin(gw, "pin", model="ui/echo-b").status_code == 200
    status = httpx.get(f"{gw.url}/admin/status", headers=bearer(ADMIN_KEY), timeout=10).json()
    assert all(m["pinned"] for m in status["models"])
    assert all(m["keep_alive_left_s"] is None for m in status["models"])
    catalogue = {e["id"]: e for e in state(gw, API_KEY)["catalogue"]}
    assert catalogue["huggingface:ui/echo-a"]["pinned"] is True

    # both pinned: echo-c cannot be placed on n1 (the only node its profile allows)
    full = admin(gw, "load", model="ui/echo-c")
    assert full.status_code == 503 and full.json()["error"]["code"] == "insufficient_memory"
    assert admin(gw, "unpin", model="ui/echo-b").json()["pinned"] is False
    # (the failed load is remembered for a short backoff: wait it out as a client would)
    gw.wait_for(lambda: admin(gw, "load", model="ui/echo-c").status_code == 200, timeout=20)
    loaded = {m["id"] for m in fleet.neuron_models("n1").values()}
    assert loaded == {"huggingface:ui/echo-a", "huggingface:ui/echo-c"}  # echo-b was evicted


def test_a_model_without_a_profile_cannot_be_pinned(fleet: Fleet) -> None:
    model = fleet.publish_echo("ui/adhoc", memory_mb=10)
    fleet.load_on("n2", model)
    gw = fleet.gateway(dashboard="admin")
    gw.wait_for(lambda: any(e["id"] == model for e in gw.catalogue().values()))
    answer = admin(gw, "pin", key=None, model=model)
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "model_not_configured"
    assert "models.toml" in answer.json()["error"]["message"]


def test_admin_actions_asked_by_another_sites_page_are_refused(fleet: Fleet) -> None:
    """Fetch Metadata: with auth off, a page elsewhere (another port of this host included)
    could otherwise load and unload models through its visitor's browser."""
    gw = fleet.gateway(models=publish(fleet), dashboard="admin")  # no keys
    for site in ("cross-site", "same-site", "Same-Site"):
        for action in ("load", "unload", "pin", "unpin"):
            answer = httpx.post(
                f"{gw.url}/admin/models/{action}",
                json={"model": "ui/echo-c"},
                headers={"Sec-Fetch-Site": site},
                timeout=30,
            )
            assert answer.status_code == 403, (site, action, answer.text)
            assert answer.json()["error"]["code"] == "cross_site_request"
    assert fleet.neuron_models("n1") == {} and fleet.neuron_models("n2") == {}
    for site in ("same-origin", "none"):  # the dashboard itself; a URL typed by its user
        answer = httpx.post(
            f"{gw.url}/admin/models/load",
            json={"model": "ui/echo-c"},
            headers={"Sec-Fetch-Site": site},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text


# ---- traffic series ----------------------------------------------------------------------------


def test_traffic_series_are_differences_of_the_gateway_metrics() -> None:
    metrics = GatewayMetrics()
    series = TrafficSeries(metrics, step_s=5, window_s=20)
    one = metrics.series("/v1/chat/completions", "huggingface:a/b", "n1")
    series.sample(now=1000.0)  # the baseline
    one.completion_tokens.inc(100)
    one.ttft.observe(0.2)
    one.ttft.observe(0.4)
    one.ok.inc(2)
    metrics.series("/v1/messages", "huggingface:a/b", "n1").ttft.observe(0.6)
    series.sample(now=1005.0)
    series.sample(now=1010.0)  # nothing happened in this step
    (line,) = series.to_json()
    assert (line["model"], line["node"]) == ("huggingface:a/b", "n1")
    assert line["at"] == [1005.0, 1010.0]
    assert line["tokens_per_s"] == [20.0, 0.0]
    assert line["ttft_s"] == [pytest.approx(0.4), None]  # over both routes
    assert line["requests"] == [2, 0] and line["errors"] == [0, 0]
    # requests answered before a node was picked have no chart
    metrics.series("/v1/chat/completions", "other", "none").error.inc()
    series.sample(now=1015.0)
    assert len(series.to_json()) == 1
    # a pair silent for a whole window leaves the charts; at most a window of points is kept
    series.sample(now=1020.0)
    series.sample(now=1025.0)
    assert series.to_json()[0]["at"] == [1005.0, 1010.0, 1015.0, 1020.0, 1025.0]
    series.sample(now=1030.0)
    assert series.to_json() == []


def test_the_gateway_samples_its_traffic_while_the_dashboard_is_on(fleet: Fleet) -> None:
    gw = fleet.gateway(models=publish(fleet), dashboard="admin")
    dashboard = gw.server.app.state.dashboard
    dashboard.series.sample()
    list(
        gw.client().chat.completions.create(
            model="ui/echo-a", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    time.sleep(0.05)
    dashboard.series.sample()
    (line,) = state(gw)["series"]  # (the background sampler may have split the step)
    assert (line["model"], line["node"]) == ("huggingface:ui/echo-a", "n1")
    assert max(line["tokens_per_s"]) > 0 and any(t for t in line["ttft_s"] if t)
    assert fleet.gateway().server.app.state.dashboard is None  # off: no sampler at all
