"""Helpers for the real-browser test: a JupyterLab server in a subprocess and a few page actions.

Kept apart from the test module so the test reads as what it checks. Nothing here downloads
anything: the browser is the system's Chromium (Debian's `/usr/bin/chromium`), driven by Playwright.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).parent / "artifacts"  # ignored by git; screenshots for a human to look at

# JupyterLab settings that keep toasts (news, update checks) off the screenshots.
_LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        '{"fetchNews": "false", "checkForUpdates": false}',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """`jupyter lab` on 127.0.0.1 with a random port and token, its own config/settings/runtime dirs,
    and its log (server and kernels: kernels inherit its stderr) kept in a file."""

    def __init__(self, root: Path, home: Path, env: dict[str, str] | None = None) -> None:
        self.root, self.home = root, home
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.log_path = home / "jupyter.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, query: str = "") -> str:
        return f"{self.base_url}/{path.lstrip('/')}?{query + '&' if query else ''}token={self.token}"

    def start(self, timeout: float = 120.0) -> None:
        for sub in ("config", "data", "runtime", "settings", "workspaces"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        for name, text in _LAB_SETTINGS.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        env = {**os.environ, **self.extra_env,
               "JUPYTER_CONFIG_DIR": str(self.home / "config"),
               "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": str(self.home / "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
               "PYTHONUNBUFFERED": "1"}
        env.pop("JUPYTER_PATH", None)
        # `python -m jupyterlab` from this interpreter: the kernelspec's "python" becomes this same
        # interpreter (jupyter_client's rule), so the kernel imports the nbtune under test.
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}", "--ip=127.0.0.1",
               f"--ServerApp.token={self.token}", "--ServerApp.password=", "--allow-root",
               f"--ServerApp.root_dir={self.root}", "--ServerApp.open_browser=False",
               "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer on port {self.port} in {timeout:.0f} s\n{self.log_tail()}")

    def api(self, method: str, path: str) -> Any:
        import json

        request = urllib.request.Request(self.url(path), method=method)
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stop every kernel through the REST API (frees each kernel's torch before the next test)."""
        with contextlib.suppress(Exception):
            for kernel in self.api("GET", "api/kernels"):
                with contextlib.suppress(Exception):
                    self.api("DELETE", f"api/kernels/{kernel['id']}")

    def stop(self) -> None:
        """Stop the server and its kernels; whatever is still alive after a grace period is killed."""
        if self.proc is None:
            return
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)  # the kernels, among others
        except psutil.Error:
            children = []
        self.shutdown_kernels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # jupyter_server shuts its kernels down on SIGTERM
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no jupyter log)"
        return "\n".join(text.splitlines()[-lines:])

    @contextlib.contextmanager
    def explained(self, page: Any, label: str) -> Iterator[None]:
        """On any failure inside: a screenshot `browser-FAILED-<label>.png`, and the server log's tail in the
        assertion message (kernel tracebacks land in that log too)."""
        try:
            yield
        except Exception as exc:
            shot = ARTIFACTS / f"browser-FAILED-{label}.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"{type(exc).__name__}: {exc}\n(screenshot: {shot})\n"
                                 f"--- jupyter server log, last lines ---\n{self.log_tail()}") from exc


# ---------------------------------------------------------------------------- page helpers
# Both UIs (JupyterLab and Notebook 7) are the same Lumino notebook widget: the same selectors work in each.
CELL = ".jp-Notebook .jp-Cell"


def open_notebook(page: Any, server: JupyterServer, url: str, path: str, timeout: float = 120_000) -> None:
    """Go to a notebook and wait until its kernel is started, idle and connected to this page (a
    kernel-choice dialog, if any, gets Enter). The server's session list says when the kernel is
    connected; the execution indicator is the same component in JupyterLab and Notebook 7."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout)
    page.wait_for_selector(f"{CELL} .jp-InputArea-editor", timeout=timeout)
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        if page.locator(".jp-Dialog").count():
            page.keyboard.press("Enter")
        kernels = [s["kernel"] for s in server.api("GET", "api/sessions") if s["path"] == path]
        ready = kernels and kernels[0]["execution_state"] == "idle" and kernels[0]["connections"] > 0
        if ready and page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count():
            return
        page.wait_for_timeout(250)
    raise TimeoutError(f"the notebook's kernel did not become idle in {timeout / 1000:.0f} s")


def cell(page: Any, index: int) -> Any:
    return page.locator(CELL).nth(index)


def run_cell(page: Any, index: int, attempts: int = 3) -> None:
    """Select cell `index` (by its prompt area, so no widget swallows the click) and run it with Shift+Enter.

    A run the frontend accepted shows `[*]:` or `[n]:` at once; a keypress that arrived before the
    notebook was fully wired up leaves `[ ]:`, and only then is it pressed again (never a second run)."""
    target = cell(page, index)
    prompt = target.locator(".jp-InputArea-prompt")
    for _ in range(attempts):
        target.scroll_into_view_if_needed()
        prompt.click()
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("(el) => /\\[(\\*|\\d+)\\]/.test(el.innerText)", arg=prompt.element_handle(),
                                   timeout=10_000)
            return
        except Exception:  # playwright's TimeoutError: not accepted, try again
            continue
    raise TimeoutError(f"cell {index} did not start running after {attempts} tries")
