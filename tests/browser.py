"""A headless Chromium driven over the Chrome DevTools Protocol, for the tests of `prmtool view`
and `prmtool review` and for bench/bench_view.py.

Chromium talks CDP over two pipes (`--remote-debugging-pipe`: it reads commands from file
descriptor 3 and writes replies and events to descriptor 4, each message JSON ended by a NUL
byte), so no websocket client and no debugging port are needed: the standard library is enough.
The browser is Debian's `chromium` package (`apt-get install chromium`), never a downloaded build.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# What lets it run as root in a container, with no network of its own and nothing in the background.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_test(test):
    """Mark a test that drives Chromium: `-m browser` selects them; skipped, saying why, without it."""
    skip = pytest.mark.skipif(
        chromium_path() is None, reason="needs Debian's chromium (apt-get install -y chromium); .ci/run installs it"
    )
    return pytest.mark.browser(skip(test))


class BrowserError(Exception):
    pass


class Browser:
    """One headless Chromium with one page. `goto(url)`, `evaluate(js)`, `click(selector)`,
    `screenshot()`; `console_errors` collects what the page logged as errors or threw."""

    def __init__(self, width: int = 1200, height: int = 900):
        executable = chromium_path()
        if executable is None:
            raise BrowserError("chromium is not installed (apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="prmtool-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child's descriptors 3 and 4 must be these pipes: dup them there in the child.
        os.set_inheritable(to_browser_read, True)
        os.set_inheritable(from_browser_write, True)

        def place_pipes():
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=place_pipes,
            close_fds=False,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        self.console_errors: list[str] = []
        try:
            targets = self.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable", session=True)
            self.send(
                "Emulation.setDeviceMetricsOverride",
                session=True,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except Exception:
            self.close()
            raise

    # --- the protocol ---------------------------------------------------------------------

    def send(self, method: str, session: bool = False, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self._note(reply)

    def _receive(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _note(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.console_errors.append(f"{params['entry'].get('text')} ({params['entry'].get('url', '')})")
        self._events.append(event)

    def wait_for_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for number, event in enumerate(self._events):
                if event.get("method") == method:
                    return self._events.pop(number)
            self._note(self._receive(deadline))

    # --- what the tests do ----------------------------------------------------------------

    def goto(self, url: str, timeout: float = 60.0) -> None:
        """Open `url` and wait for its load event."""
        self._events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_for_event("Page.loadEventFired", timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send(
            "Runtime.evaluate",
            session=True,
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 10.0) -> None:
        """Poll a JavaScript expression until it is truthy (an element found, a count reached)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(f"Boolean({expression})"):
                return
            time.sleep(0.05)
        raise BrowserError(f"timed out waiting for: {expression}")

    def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the first element matching `selector`."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element matches {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left", clickCount=1
            )

    def type_text(self, text: str) -> None:
        """Type into the focused element."""
        self.send("Input.insertText", session=True, text=text)

    def screenshot(self, selector: str | None = None) -> bytes:
        """A PNG of the viewport, or of the element matching `selector` (which must fit in the
        viewport when the page is scrolled to the top)."""
        params: dict = {"format": "png"}
        if selector is not None:
            box = self.evaluate(
                # from the top of the page, where a sticky header covers nothing below it
                f"(() => {{ const e = document.querySelector({json.dumps(selector)}); window.scrollTo(0, 0);"
                " const r = e.getBoundingClientRect(); const m = 8; const x = Math.max(0, r.x - m);"
                " const right = Math.min(document.documentElement.clientWidth, r.right + m);"
                " return [x, r.y - m, right - x, r.height + 2 * m]; })()"
            )
            params["clip"] = {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", session=True, **params)["data"])

    def close(self) -> None:
        try:
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()
        for descriptor in (self._to_browser, self._from_browser):
            try:
                os.close(descriptor)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
