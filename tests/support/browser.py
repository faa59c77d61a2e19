"""A real headless Chromium (Debian's, installed by `make tools`) driven over the DevTools protocol.

`open_page(file)` loads a local page in a fresh profile at a phone's size and reports what a person would
notice: every picture's decoded width, console messages and uncaught errors, requests that left the page
(anything but data: and the file itself), whether the page is wider than the screen, and a full-page
screenshot. aiohttp (a kubetune dependency) speaks the protocol's WebSocket; no browser driver package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.paths import REPO

ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots a person can look at (ignored by git)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


def find_chromium() -> str:
    """The Chromium `make tools` links into .tools/bin, else one on PATH; an assertion says how to get it."""
    local = REPO / ".tools" / "bin" / "chromium"
    found = str(local) if local.exists() else shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: run `make tools` (it installs Debian's chromium package)"
    return found


@dataclass
class Page:
    """What loading a page showed."""

    images: list[dict[str, Any]] = field(default_factory=list)  # {"alt", "naturalWidth", "complete"}
    console: list[str] = field(default_factory=list)  # console messages of level warning or error
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # URLs fetched other than data: and the page itself
    title: str = ""
    overflow: bool = False  # the page is wider than the screen
    text: str = ""
    screenshot: bytes = b""


class _Session:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == ident:
                assert "error" not in message, f"{method}: {message['error']}"
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    async def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            message = json.loads((await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))).data)
            self.events.append(message)


def _port(profile: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    active = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if active.is_file() and active.read_text().strip():
            return int(active.read_text().splitlines()[0])
        assert process.poll() is None, f"Chromium exited with {process.returncode}"
        time.sleep(0.1)
    raise AssertionError("Chromium did not open its DevTools port")


CHECK_SCRIPT = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, naturalWidth: i.naturalWidth, complete: i.complete})),
  title: document.title,
  overflow: document.documentElement.scrollWidth > window.innerWidth + 1,
  text: document.body.innerText,
  height: document.documentElement.scrollHeight
})"""


async def _inspect(port: int, url: str) -> Page:
    async with aiohttp.ClientSession() as http:
        targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        target = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            session = _Session(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                await session.call(f"{domain}.enable")
            await session.call("Emulation.setDeviceMetricsOverride", **PHONE)
            await session.call("Page.navigate", url=url)
            await session.wait_for("Page.loadEventFired")
            found = json.loads((await session.call("Runtime.evaluate", expression=CHECK_SCRIPT))["result"]["value"])
            clip = {"x": 0, "y": 0, "width": PHONE["width"], "height": found["height"], "scale": 1}
            shot = await session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
            return _page(session.events, found, shot["data"], url)


def _page(events: list[dict[str, Any]], found: dict[str, Any], screenshot: str, url: str) -> Page:
    import base64

    page = Page(images=found["images"], title=found["title"], overflow=found["overflow"], text=found["text"])
    page.screenshot = base64.b64decode(screenshot)
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            page.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            page.errors.append(str(params["exceptionDetails"].get("text")))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            page.console.append(str(params["entry"].get("text")))
        elif method == "Network.requestWillBeSent":
            requested = str(params["request"]["url"])
            if not requested.startswith("data:") and requested != url:
                page.requests.append(requested)
        elif method == "Network.loadingFailed":
            page.errors.append(f"load failed: {params.get('errorText')}")
    return page


def open_page(path: Path) -> Page:
    """Load `path` (a local file) in a fresh headless Chromium at a phone's size and report what it showed."""
    with tempfile.TemporaryDirectory(prefix="kubetune-chromium-") as tmp:
        profile = Path(tmp)
        command = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            return asyncio.run(_inspect(_port(profile, process), path.resolve().as_uri()))
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()


def keep_screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    """The screenshot under the test's tmp_path and, for people, under tests/artifacts/; returns the latter."""
    (tmp_path / name).write_bytes(page.screenshot)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / name
    kept.write_bytes(page.screenshot)
    print(f"screenshot: {kept}")
    return kept
