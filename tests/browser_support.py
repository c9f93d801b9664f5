"""Helpers for the real-browser test: a JupyterLab server in a subprocess and a few page actions.

Kept apart from the test module so the test reads as what it checks. Nothing here downloads
anything: the browser is the system's Chromium (Debian's `/usr/bin/chromium`), driven by Playwright.
"""

from __future__ import annotations

import contextlib
import importlib.util
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
    # every cell in the page, not only those scrolled into view: a test reads the whole notebook's text
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
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
               "JUPYTER_DATA_DIR": str(self.home / "data"),  # its own notebook signatures (`trust`)
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

    def trust(self, path: Path) -> None:
        """Sign the notebook at `path` as this server's own, as JupyterLab signs a notebook it saves after
        running it: reopened, its HTML outputs show as they were (an untrusted notebook's are sanitised,
        which drops inline SVG)."""
        import nbformat
        from nbformat.sign import NotebookNotary

        notebook = nbformat.read(path, as_version=4)
        NotebookNotary(data_dir=str(self.home / "data")).sign(notebook)

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


# ---------------------------------------------------------------------------- the fixtures' parts
LONG = 120_000  # ms: a shared 2-core CI machine can be several times slower than a laptop
SHORT = 60_000


def require_browser() -> None:
    """Skip without Chromium or the Python packages the browser tests drive it with; in CI (CI=true) fail."""
    missing = None if CHROMIUM.exists() else str(CHROMIUM)
    for package in ("jupyterlab", "nbformat", "playwright"):
        if missing is None and importlib.util.find_spec(package) is None:
            missing = f"python package {package}"
    if missing is None:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing} is missing; CI must run the browser test (`make test` installs chromium)")
    pytest.skip(f"{missing} is missing (apt-get install chromium); CI=true makes this a failure")


@contextlib.contextmanager
def lab_server(tmp_path_factory: Any) -> Iterator[JupyterServer]:
    """A started JupyterServer whose root holds a small jsonl data file (32 demo rows); stopped afterwards."""
    import json

    from nbtune.data.demo import demo_splits

    root, home = tmp_path_factory.mktemp("notebooks"), tmp_path_factory.mktemp("jupyter-home")
    with (root / "train.jsonl").open("w", encoding="utf-8") as f:
        for row in demo_splits()[0][:32]:
            f.write(json.dumps(row) + "\n")
    server = JupyterServer(root, home, env={
        "NBTUNE_CACHE": str(tmp_path_factory.mktemp("nbtune-cache")),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """The system's Chromium, launched by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def new_page(browser: Any, server: JupyterServer) -> Iterator[Any]:
    """A page in a fresh browser context; afterwards every kernel is stopped (each holds torch)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    context.set_default_timeout(SHORT)
    try:
        yield context.new_page()
    finally:
        context.close()
        server.shutdown_kernels()


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


# ---------------------------------------------------------------------------- a notebook executed and saved
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def saved_notebook_cells(model_dir: Path) -> list[str]:
    """What a researcher's notebook holds: two evaluated runs (exact match, so the answering bars show; one
    with sample answers), their comparison, a predictions table, and a background run whose Stop comes
    from a later cell, as the panel's Stop button calls it."""
    common = ("data: train.jsonl\neval_split: 0.25\nsteps: 4\nbatch_size: 2\nmetric: exact_match\n"
              "metric_samples: 4\nsave: false\n")
    return [
        f"%load_ext nbtune\n%config Finetune.defaults = {{'model': {str(model_dir)!r}}}\nimport nbtune",
        f"%%finetune ev\n{common}sample_every: 2",
        f"%%finetune ev_lr\nlr: 0.001\n{common}",
        "nbtune.compare('ev', 'ev_lr')",
        "nbtune.runs['ev'].predictions()",
        "%%finetune bg --background\ndata: train.jsonl\nsteps: 1000\nbatch_size: 2\nmetric: none\nsave: false",
        "import time\nbg = nbtune.runs['bg']\n"
        "while len(bg.history) < 3 and bg.status in ('pending', 'running'):\n    time.sleep(0.05)\n"
        "bg.stop()\nbg.wait(120)\nprint(bg.status)",
    ]


def execute_and_save(root: Path, name: str, model_dir: Path, timeout: int = 300) -> Path:
    """Execute `saved_notebook_cells` top to bottom in a real kernel of this Python (nbclient, as
    notebooks/execute.py does) with `root` as working directory, and save it there as `name`: what
    JupyterLab writes to disk after "Run All" and save: outputs as the frontend holds them, and no widget
    state (JupyterLab saves it only with "Save Widget State Automatically", off by default; nbclient would
    save it, and a reopened page would then draw dead copies of the widgets instead of the error line)."""
    import json

    import nbformat
    from nbclient import NotebookClient

    from nbtune.data.demo import demo_splits

    data = root / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in demo_splits()[0][:32]), encoding="utf-8")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in saved_notebook_cells(model_dir)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    # The kernel inherits this process's environment: conftest.py made it offline (HF_HUB_OFFLINE).
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", allow_errors=False,
                            store_widget_state=False, extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(root)}})
    client.execute()
    path = root / name
    nbformat.write(notebook, path)
    return path


def output_mimes(path: Path) -> list[tuple[int, str, list[str]]]:
    """(cell index, output type, mime types) of every output the saved notebook holds."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return [(i, out["output_type"], sorted(out.get("data", {})))
            for i, cell in enumerate(notebook.cells) for out in cell.get("outputs", [])]
