"""Execute the shipped notebooks headless and write a static HTML copy next to each.

    python notebooks/execute.py                      # every notebooks/NN-*.ipynb
    python notebooks/execute.py --summary notebooks/01-quickstart.ipynb

Each notebook runs top to bottom in a fresh kernel of this Python (nbclient), with the notebook's folder
as working directory. The kernel's resident memory (with its child processes) is sampled every 50 ms,
so the table at the end shows each notebook's wall time and kernel peak RSS: the Binder budget is 2 GB.
The notebooks in git keep no outputs; the executed copies exist only as `NN-name.html` (git-ignored).
`--summary` prints the text output of the cells tagged `summary` (what `make demo` shows).
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

HERE = Path(__file__).resolve().parent


class KernelMemory:
    """Peak RSS of a kernel process tree, sampled on a daemon thread."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.peak_mb = 0.0
        self._process = psutil.Process(pid)
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self._every):
            try:
                tree = [self._process, *self._process.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree)
            except psutil.Error:  # the kernel is shutting down
                return
            self.peak_mb = max(self.peak_mb, rss / 2**20)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak_mb


def execute(path: Path, timeout: int) -> tuple[nbformat.NotebookNode, float, float, str | None]:
    """Run one notebook; returns (executed notebook, wall seconds, kernel peak MB, error or None)."""
    notebook = nbformat.read(path, as_version=4)
    # The kernel's own log says only that local TCP is unencrypted; cell errors still come back.
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(path.parent)}})
    watch: dict[str, KernelMemory] = {}

    def on_start(**_: object) -> None:
        # The local provisioner owns the kernel's Popen; its pid is the process to watch.
        watch["memory"] = KernelMemory(client.km.provisioner.process.pid)

    client.on_notebook_start = on_start
    error = None
    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    wall = time.perf_counter() - started
    peak = watch["memory"].stop() if "memory" in watch else float("nan")
    return notebook, wall, peak, error


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def static_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as a page without a kernel shows it: where an output carries both a live widget and
    its own static HTML (the comparison view), keep the HTML, since a widget needs a running kernel."""
    static = copy.deepcopy(notebook)
    for cell in static.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data and "text/html" in data:
                del data[WIDGET_VIEW]
    return static


def write_html(notebook: nbformat.NotebookNode, path: Path) -> Path:
    body, _ = HTMLExporter().from_notebook_node(static_copy(notebook))
    target = path.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def summary_text(notebook: nbformat.NotebookNode) -> str:
    """The stream output of the cells tagged `summary`."""
    lines = []
    for cell in notebook.cells:
        if "summary" in cell.get("metadata", {}).get("tags", []):
            lines += [out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream"]
    return "".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN-*.ipynb")
    parser.add_argument("--summary", action="store_true", help="print the cells tagged 'summary'")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may take")
    parser.add_argument("--keep", type=Path, help="also write the executed .ipynb files into this folder")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("[0-9][0-9]-*.ipynb"))
    rows, failed = [], False
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        notebook, wall, peak, error = execute(path.resolve(), args.timeout)
        html = write_html(notebook, path.resolve())
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, args.keep / path.name)
        rows.append((path.name, wall, peak, error or "ok"))
        failed |= error is not None
        if args.summary and not error:
            print(summary_text(notebook))
        shown = html.relative_to(Path.cwd()) if html.is_relative_to(Path.cwd()) else html
        print(f"  {wall:.0f} s, kernel peak {peak:.0f} MB, {error or 'ok'}; wrote {shown}", flush=True)
    print(f"\n{'notebook':34} {'wall s':>7} {'peak MB':>8}  result")
    for name, wall, peak, result in rows:
        print(f"{name:34} {wall:7.0f} {peak:8.0f}  {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
