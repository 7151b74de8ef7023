"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, for tests
of the operator's panel: load a page, read its live DOM, take a screenshot.

The protocol runs over `--remote-debugging-pipe` (JSON messages ending in NUL; Chromium reads
commands from its fd 3 and writes replies and events to its fd 4), so no port is opened and no
websocket library is needed.

    with Chromium() as browser:
        page = browser.open("http://127.0.0.1:9471/")
        page.wait_for("document.body.dataset.version > 0")
        page.evaluate("document.title")
        page.screenshot(Path("panel.png"))
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-default-apps", "--disable-extensions",
         "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe"]


class BrowserError(RuntimeError):
    pass


def executable() -> str:
    path = shutil.which("chromium")
    if not path:
        raise BrowserError("chromium not found: `apt-get install chromium` (Debian's package; "
                           "scripts/setup.sh installs it)")
    return path


def _above(fd: int, low: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return new


class Chromium:
    def __init__(self, width: int = 1280, height: int = 860) -> None:
        self.width, self.height = width, height
        self._ids = iter(range(1, 1 << 30))
        self._waiting: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []      # every event, in order (console, network, ...)
        self._profile = tempfile.TemporaryDirectory(prefix="neverdark-chromium-")

    def start(self) -> "Chromium":
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Above 10, so that the shell's `3<&N 4>&M` cannot overwrite one with the other.
        to_browser_r, from_browser_w = (_above(to_browser_r, 10), _above(from_browser_w, 10))
        argv = [executable(), *FLAGS, f"--user-data-dir={self._profile.name}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        # bash (dash takes no fd above 9) puts the pipes on fds 3 and 4, where Chromium reads
        # and writes the protocol.
        self._log = open(Path(self._profile.name) / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {shlex.join(argv)} 3<&{to_browser_r} 4>&{from_browser_w}"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.call("Browser.getVersion", timeout=60)
        return self

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._waiting.pop(msg["id"], None)
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.append(msg)
        with self._lock:
            for q in self._waiting.values():
                q.put({"error": {"message": "chromium exited"}})

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        msg_id = next(self._ids)
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._waiting[msg_id] = q
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"{method}: chromium is gone (exit {self.proc.poll()}): "
                               + self.log_tail()) from None
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(f"{method}: no reply within {timeout}s") from None
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (Path(self._profile.name) / "chromium.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def open(self, url: str) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        page.call("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10)
                self.proc.wait(10)
        except (BrowserError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_browser)
            self._log.close()
            self._profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        return self.browser.call(method, params, self.session, timeout)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str | None = None):
        """Evaluate until truthy; returns the value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{what or expression}: not true within {timeout}s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events
                if e.get("method") == method and e.get("sessionId") == self.session]
