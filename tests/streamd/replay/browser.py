"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe (no websocket
library needed): load a page, collect what went wrong (JS exceptions, console errors, failed requests), ask the
page what it shows, take a screenshot.

The caller starts and stops exactly one browser process (`Browser` as a context manager).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--remote-debugging-pipe", "--window-size=1200,1600",
)  # fmt: skip
TIMEOUT_S = 60.0  # a hang guard only: a page of this size loads in well under a second


@dataclass
class PageLoad:
    """What loading a page gave: problems (exceptions, console or log errors, failed requests), the page's own
    answer to a script, and a PNG screenshot."""

    problems: list[str] = field(default_factory=list)
    answer: object = None
    screenshot_png: bytes = b""


class Browser:
    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self._next_id = 0
        self._buffer = b""

    def __enter__(self) -> Browser:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def on_fds_3_and_4() -> None:  # the DevTools pipe: the browser reads fd 3 and writes fd 4
            reads, writes = os.dup(to_browser_r), os.dup(from_browser_w)  # neither is 3 or 4 unless free
            os.dup2(reads, 3)
            os.dup2(writes, 4)
            for fd in (3, 4):
                os.set_inheritable(fd, True)  # dup2 onto itself keeps close-on-exec

        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=on_fds_3_and_4, close_fds=False,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close")
        except OSError:
            pass  # already gone: wait() below reaps it
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _messages(self, deadline: float):
        while True:
            while b"\0" in self._buffer:
                message, self._buffer = self._buffer.split(b"\0", 1)
                yield json.loads(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("chromium did not answer over its DevTools pipe")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed its DevTools pipe")
            self._buffer += chunk

    def call(self, method: str, params: dict | None = None, session: str | None = None, events=None) -> dict:
        """Send a command and return its result; the events that come meanwhile go to `events` (a list)."""
        wanted = self._send(method, params, session)
        for message in self._messages(time.monotonic() + TIMEOUT_S):
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            if events is not None and "method" in message:
                events.append(message)

    def load(self, url: str, script: str) -> PageLoad:
        """Open url in a new tab, wait for its load event, evaluate `script` (its value returned), screenshot it."""
        events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session, events=events)
        self.call("Page.navigate", {"url": url}, session=session, events=events)
        deadline = time.monotonic() + TIMEOUT_S
        if not any(e["method"] == "Page.loadEventFired" for e in events):
            for message in self._messages(deadline):
                if "method" in message:
                    events.append(message)
                    if message["method"] == "Page.loadEventFired":
                        break
        result = PageLoad()
        value = self.call("Runtime.evaluate", {"expression": script, "returnByValue": True, "awaitPromise": True},
                          session=session, events=events)  # fmt: skip
        result.answer = value["result"].get("value")
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=session, events=events)  # fmt: skip
        result.screenshot_png = base64.b64decode(shot["data"])
        for event in events:
            params = event.get("params", {})
            match event["method"]:
                case "Runtime.exceptionThrown":
                    result.problems.append(f"exception: {params['exceptionDetails'].get('text')}")
                case "Runtime.consoleAPICalled" if params.get("type") == "error":
                    result.problems.append(f"console.error: {params.get('args')}")
                case "Log.entryAdded" if params["entry"].get("level") == "error":
                    result.problems.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
                case "Network.loadingFailed":
                    result.problems.append(f"request failed: {params.get('errorText')}")
                case "Network.requestWillBeSent" if not params["request"]["url"].startswith(("file:", "data:")):
                    result.problems.append(f"request outside the file: {params['request']['url']}")
        return result
