"""The web console (web/) in a real browser: Debian's Chromium driven by Playwright, against a real
local stack (devstack) with a one-second heartbeat interval, so a silent toolbox reads `unknown`
within seconds.

One walk through the page, as a person would: sign in with the demo user (keyboard only), deploy
through the form and see `deploying` turn `running` without a reload, stop it, a refused deploy
showing the API's sentence and its suggested name, an image that exits at once ending in `error`
with its sentence, the toolbox going silent (`unknown`) and coming back, the agent forgetting a
container ("agent no longer manages this container", shown apart from `unknown`), remove. Secret
environment values are never shown back. axe-core checks the page for serious accessibility
problems. Screenshots of every step go to build/screenshots/.

Waits (`expect(...)` with a timeout) are waits for a state, never claims about speed; speed is
bench/web_console.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.launcher import StackProcess

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "build" / "screenshots"
NPM_INSTALL_SECONDS = 240
#: Flags this machine needs (no sandbox as root, no network beyond loopback): see docs/web-console.md.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT = 30_000  # ms: generous waits for a state (a busy 2-core CI machine), not speed claims

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev extra: pip install -e .[dev]")
expect = playwright_api.expect


def ensure_web_modules() -> None:
    """`npm ci` in web/ when supabase-js's bundle is missing; skip when Node.js/npm or the registry is not there."""
    bundle = WEB / "node_modules" / "@supabase" / "supabase-js" / "dist" / "umd" / "supabase.js"
    axe = WEB / "node_modules" / "axe-core" / "axe.min.js"
    if bundle.is_file() and axe.is_file():
        return
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the web console needs `npm ci` in web/ (Node.js >= 20)")
    try:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WEB,
                              capture_output=True, text=True, timeout=NPM_INSTALL_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm ci in web/ did not finish within {NPM_INSTALL_SECONDS} s (is the npm registry reachable?)")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(marker in output for marker in ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ENETUNREACH")):
            pytest.skip(f"the npm registry is unreachable, so supabase-js cannot be installed:\n{output[-1000:]}")
        pytest.fail(f"npm ci in web/ failed:\n{output[-2000:]}")
    assert bundle.is_file(), "npm ci did not install @supabase/supabase-js"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    ensure_web_modules()
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (./deploy.sh test installs it as root)")
    base = tmp_path_factory.mktemp("web")
    # Heartbeats every 0.5 s, expected every 1 s with no grace: silent for 3 s reads unknown.
    with StackProcess("--port", "0", "--sweep-interval", "0", "--functions-heartbeat-interval", "1",
                      "--functions-heartbeat-grace", "0", "--standin-heartbeat-interval", "0.5",
                      data_dir=base / "pg", state_dir=base / "state") as proc:
        yield proc


@pytest.fixture(scope="module")
def browser(stack: StackProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


class Shots:
    """Numbered screenshots of each step, in build/screenshots/ (git-ignored)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.n = 0
        SHOTS.mkdir(parents=True, exist_ok=True)
        for old in SHOTS.glob("web-console-*.png"):
            old.unlink()

    def __call__(self, step: str) -> None:
        self.n += 1
        path = SHOTS / f"web-console-{self.n:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")


def standin(stack: StackProcess, path: str) -> None:
    response = httpx.post(f"{stack.env['DTMA_STANDIN_URL']}{path}", timeout=10, trust_env=False)
    assert response.status_code < 300, response.text


def row(page: Any, name: str) -> Any:
    return page.locator(f'#servers tr[data-name="{name}"]')


def deploy(page: Any, name: str, image: str, env: dict[str, str] | None = None) -> None:
    page.fill("#d-image", image)
    page.fill("#d-name", name)
    for key, value in (env or {}).items():
        page.click("#env-add")
        page.locator(".env-name").last.fill(key)
        page.locator(".env-value").last.fill(value)
    page.click("#deploy-submit")


def test_a_person_deploys_watches_and_manages_servers_in_a_real_browser(stack: StackProcess, browser: Any) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    shot = Shots(page)

    # Sign in, keyboard only: the email is filled in locally, the password field has focus.
    page.goto(f"{stack.url}/")
    page.evaluate("window.__sameDocument = 'still here'")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#email")).to_have_value(stack.env["DEMO_USER_EMAIL"])
    shot("sign-in")
    page.keyboard.type("wrong password")
    page.keyboard.press("Enter")
    expect(page.locator("#sign-in-error")).to_contain_text("Invalid login credentials")
    page.locator("#password").focus()
    page.keyboard.type(stack.env["DEMO_USER_PASSWORD"])
    page.keyboard.press("Enter")
    expect(page.locator("#app")).to_be_visible(timeout=WAIT)
    expect(page.locator("#who-email")).to_contain_text(stack.env["DEMO_USER_EMAIL"])
    toolbox = page.locator(f'#toolboxes tr[data-toolbox-id="{stack.env["DEMO_TOOLBOX_ID"]}"]')
    expect(toolbox.locator('[data-field="status"]')).to_have_text("active", timeout=WAIT)
    expect(toolbox).to_contain_text("s ago")
    expect(page.locator("body")).not_to_have_attribute("data-live", "connecting", timeout=WAIT)
    shot("signed-in")

    # Deploy through the form; the pull takes 3 s, so `deploying` is seen, then `running`, live.
    secret = "s3cret-value-never-shown-9f2c"
    deploy(page, "web-one", "standin/slow-3:latest", env={"API_TOKEN": secret})
    one = row(page, "web-one")
    expect(one.locator('[data-field="status"]')).to_have_text("deploying", timeout=WAIT)
    shot("deploying")
    expect(page.locator(".env-value")).to_have_value("")  # the secret left the page with the request
    expect(one.locator('[data-field="status"]')).to_have_text("running", timeout=WAIT)
    expect(one.locator('[data-field="health"]')).to_have_text("healthy", timeout=WAIT)
    expect(one.locator('[data-field="mcp"]')).to_have_text("ready", timeout=WAIT)
    expect(page.locator("#announcer")).to_contain_text("web-one: deploying → running")
    assert secret not in page.content()
    one.locator("summary").click()
    expect(one.locator("ol.timeline li").first).to_be_visible()
    expect(one.locator("ol.timeline")).to_contain_text("running")
    shot("running")

    # Only the actions the state machine allows are enabled.
    expect(one.locator('[data-action="start"]')).to_be_disabled()
    expect(one.locator('[data-action="stop"]')).to_be_enabled()

    # Accessibility: axe-core finds nothing serious or critical on the full page.
    page.add_script_tag(path=str(WEB / "node_modules" / "axe-core" / "axe.min.js"))
    found = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                          ".map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help}))")
    serious = [v for v in found if v["impact"] in ("serious", "critical")]
    assert serious == [], json.dumps(serious, indent=2)

    # Stop it.
    one.locator('[data-action="stop"]').click()
    expect(one.locator('[data-field="status"]')).to_have_text("stopped", timeout=WAIT)
    expect(one.locator('[data-action="start"]')).to_be_enabled()
    shot("stopped")

    # A refused deploy: the name is taken; the API's sentence and its suggested name are shown.
    deploy(page, "web-one", "mcp/everything:latest")
    error = page.locator("#deploy-error")
    expect(error).to_be_visible(timeout=WAIT)
    expect(error.locator('[data-field="message"]')).to_contain_text("web-one")
    assert (error.get_attribute("data-code") or "") != ""
    expect(page.locator("#d-name")).to_have_attribute("aria-invalid", "true")
    shot("refused")
    # The API suggests a free name: one click puts it in the form.
    error.locator('[data-field="suggestion"]').click()
    expect(page.locator("#d-name")).not_to_have_value("web-one")
    expect(page.locator("#d-name")).to_be_focused()

    # An image that exits at once ends in `error`, with the reason as a sentence.
    deploy(page, "web-exit", "standin/exit-3:latest")
    failed = row(page, "web-exit")
    expect(failed.locator('[data-field="status"]')).to_have_text("error", timeout=WAIT)
    expect(failed.locator('[data-field="error"]')).to_contain_text("3", timeout=WAIT)
    assert len(failed.locator('[data-field="error"]').inner_text()) > 20
    shot("exited")

    # The toolbox goes silent: its servers read `unknown` (no database write: the stream knows when);
    # it comes back and they read what they are again.
    standin(stack, "/_standin/heartbeats/pause")
    expect(one.locator('[data-field="status"]')).to_have_text("unknown", timeout=WAIT)
    expect(one.locator('[data-field="error"]')).to_contain_text("has not reported", timeout=WAIT)
    expect(toolbox.locator('[data-field="status"]')).to_have_text("stale", timeout=WAIT)
    shot("silent")
    standin(stack, "/_standin/heartbeats/resume")
    expect(one.locator('[data-field="status"]')).to_have_text("stopped", timeout=WAIT)
    expect(toolbox.locator('[data-field="status"]')).to_have_text("active", timeout=WAIT)
    shot("back")

    # The agent restarts and forgets its containers (a direct read of the agent tells): shown apart from
    # unknown, and only removal is offered.
    standin(stack, "/_standin/restart")
    page.click("#refresh")
    expect(one.locator('[data-field="unmanaged"]')).to_have_text("agent no longer manages this container",
                                                                 timeout=WAIT)
    expect(one.locator('[data-field="status"]')).not_to_have_text("unknown")
    expect(one.locator('[data-action="start"]')).to_be_disabled()
    expect(one.locator('[data-action="remove"]')).to_be_enabled()
    shot("unmanaged")

    # Remove both, confirming in the row.
    for name in ("web-one", "web-exit"):
        row(page, name).locator('[data-action="remove"]').click()
        row(page, name).locator('[data-action="confirm-remove"]').click()
        expect(row(page, name)).to_have_count(0, timeout=WAIT)
    expect(page.locator("#servers-empty")).to_be_visible()
    shot("removed")

    # All of it happened in one document: no reload, no navigation.
    assert page.evaluate("window.__sameDocument") == "still here"
    assert len(navigations) == 1, navigations
    assert errors == [], errors


def test_the_stack_serves_the_console_without_shadowing_the_functions(stack: StackProcess) -> None:
    with httpx.Client(base_url=stack.url, timeout=10, trust_env=False) as http:
        page = http.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "<title>" in page.text
        assert "functions" in http.get("/").json()  # a program asking / still gets the index
        config = http.get("/config.json").json()
        assert config["functionsUrl"] == f"{stack.url}/functions/v1" and config["realtime"] is False
        assert http.get("/package.json").status_code == 404  # only the page's own files are served
        assert http.get("/mcp_status").json()["error"]["code"] == "unauthenticated"
        refused = http.post("/auth/v1/token", params={"grant_type": "password"},
                            json={"email": stack.env["DEMO_USER_EMAIL"], "password": "nope"})
        assert refused.status_code == 400 and refused.json()["error_code"] == "invalid_credentials"
        session = http.post("/auth/v1/token", params={"grant_type": "password"},
                            json={"email": stack.env["DEMO_USER_EMAIL"],
                                  "password": stack.env["DEMO_USER_PASSWORD"]}).json()
        assert session["token_type"] == "bearer" and session["user"]["id"] == stack.env["DEMO_USER_ID"]
        listed = http.get("/functions/v1/mcp_status", headers={"Authorization": f"Bearer {session['access_token']}"})
        assert listed.status_code == 200, listed.text
        renewed = http.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                            json={"refresh_token": session["refresh_token"]})
        assert renewed.status_code == 200 and renewed.json()["refresh_token"] != session["refresh_token"]
        reused = http.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                           json={"refresh_token": session["refresh_token"]})
        assert reused.status_code == 400  # a refresh token is good once
