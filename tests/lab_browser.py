"""JupyterLab in headless Chromium, driven over the DevTools protocol (no Selenium/Playwright:
neither installs a browser offline; Debian's chromium and websocket-client are enough).

`lab(root)` starts a JupyterLab server on a free localhost port with a random token and the
app exposed as ``window.jupyterapp`` (its own flag, meant for exactly this); `Browser` opens
a page and evaluates JavaScript in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket

from dbkit import runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lab(root: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """A JupyterLab server serving `root`; yields the base URL with its token."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.open_browser=False", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
           "jupyterlab.NeverCheckForUpdate", "--allow-root"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited: {log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield f"{url}|{token}"
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.kill()


class Browser:
    """One headless Chromium page and a DevTools connection to it."""

    def __init__(self, chromium: str, size: tuple[int, int] = (1400, 1000)) -> None:
        # Chromium's helpers may still write into the profile as it is removed (CI once failed on
        # that: "Directory not empty: 'Default'"); they are ended with the browser's session.
        self.profile = tempfile.TemporaryDirectory(prefix="dbkit-lab-chromium-", ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             f"--user-data-dir={self.profile.name}", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "TMPDIR": self.profile.name})  # its org.chromium.* scratch goes with the profile
        port = None
        for line in self.proc.stderr:  # Chromium prints the port it chose
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("chromium did not open a DevTools port")
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(p for p in pages if p["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=180,
                                              suppress_origin=True)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}…: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(RuntimeError):
                value = self.js(expression)
                if value:
                    return value
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        runner.end_process_group(self.proc)
        self.profile.cleanup()


def kernel_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
