"""The slot inspector in a real browser: JupyterLab on localhost runs a notebook that builds it on the tiny profile,
headless Chromium (Debian's `chromium` package, driven by Playwright) clicks a token chip and the slots table follows.

Needs the `chromium` package (`sudo apt-get install -y chromium`; `.ci/run` installs it where apt works) or the path of
a Chromium binary in $CHROMIUM. Playwright's own browser downloads are never used. The screenshot goes to
results/browser/slot_inspector.png.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "results" / "browser" / "slot_inspector.png"
INSTALL_HINT = ("Chromium not found: install Debian's package with `sudo apt-get install -y chromium` (or set "
                "CHROMIUM=/path/to/chromium); the browser test never downloads a browser.")

SETUP = """\
from smf_lib.data import load_facts, load_known_facts
from smf_lib.models import load_base_model
from smf_lib.pipeline import prepare_memory
from smf_lib.profiles import get_profile
from smf_lib.training import TrainConfig
from smf_lib.widgets import SlotInspector

model, tokenizer = load_base_model("tiny")
texts = [f.train[0] for f in load_facts()[50:80]]
background = prepare_memory(model, tokenizer, texts, get_profile("tiny").memory, progress=False)
facts = load_facts(limit=3)"""
SHOW = """\
inspector = SlotInspector(model, tokenizer, background, facts, TrainConfig(top_t=20), batch=facts[:2],
                          known=load_known_facts()[:6], progress=False)
inspector"""


def chromium_path() -> str | None:
    """$CHROMIUM, else the first Chromium on PATH."""
    named = os.environ.get("CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll the server's status API until it answers; fail with its log if it dies or does not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def chromium() -> str:
    """The Chromium binary to drive (checked before any server starts); skip with how to install it when missing."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the `test` extra)")
    executable = chromium_path()
    if executable is None:
        pytest.skip(INSTALL_HINT)
    return executable


@pytest.fixture
def lab(chromium, tmp_path):
    """A JupyterLab server on a free localhost port, token disabled, serving a temporary folder with the notebook."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(SHOW)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "inspector.ipynb")
    port, log = free_port(), tmp_path / "lab.log"
    # Start the notebook's kernel without asking, and no question about news: no dialog hides the notebook.
    settings = tmp_path / "jupyter" / "settings" / "@jupyterlab"
    for name, value in (("notebook-extension/tracker", '{"autoStartDefaultKernel": true}'),
                        ("apputils-extension/notification", '{"fetchNews": "false"}')):
        (settings / f"{name}.jupyterlab-settings").parent.mkdir(parents=True, exist_ok=True)
        (settings / f"{name}.jupyterlab-settings").write_text(value)
    # The user's own Jupyter configuration, data, runtime and workspace files stay out of the way.
    env = os.environ | {f"JUPYTER{key}": str(tmp_path / "jupyter" / folder) for key, folder in (
        ("_CONFIG_DIR", "config"), ("_DATA_DIR", "data"), ("_RUNTIME_DIR", "run"), ("LAB_SETTINGS_DIR", "settings"),
        ("LAB_WORKSPACES_DIR", "workspaces"))} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}",
               "--ServerApp.terminals_enabled=False", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    command += ["--allow-root"] if os.geteuid() == 0 else []  # containers and CI machines often run as root
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: the kernel goes down with it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, server, log)
        yield url, log
    finally:
        server.send_signal(signal.SIGINT)  # twice: JupyterLab asks for confirmation on the first
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_clicking_a_chip_updates_the_slots_table(chromium, lab):
    from playwright import sync_api

    url, log = lab
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            run_notebook_and_click(page, url)
        except Exception:
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(log.read_text()[-3000:])
            raise
        finally:
            browser.close()


def run_notebook_and_click(page, url: str) -> None:
    """Open the notebook, run all cells, click a chip other than the shown token; check the table follows."""
    page.goto(f"{url}/lab/tree/inspector.ipynb")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for()  # the kernel is ready
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    page.locator(".jp-InputArea-prompt", has_text=re.compile(r"\[(\*|\d+)\]")).first.wait_for(timeout=30_000)

    chips = page.locator(".jp-OutputArea .widget-button")
    table = page.locator(".jp-OutputArea .widget-html-content", has_text=re.compile(r"Token \d+:"))
    table.wait_for()
    shown = int(re.search(r"Token (\d+):", table.inner_text()).group(1))
    assert chips.count() > 3, "the sentence's tokens are not shown as chips"
    target = 1 if shown != 1 else 2
    label = chips.nth(target).inner_text().strip()
    chips.nth(target).click()
    page.wait_for_function(
        "([n]) => [...document.querySelectorAll('.jp-OutputArea .widget-html-content')]"
        ".some(e => e.innerText.includes(`Token ${n}:`))", arg=[target], timeout=30_000)
    text = table.inner_text()
    assert f"Token {target}: " in text and label in text, text[:300]
    assert re.search(r"layer \d+", text) and "KL score" in text and "known-fact prompts reading it" in text
    assert table.locator("tr").count() > 2, "the slots table has no rows"
    page.screenshot(path=str(SCREENSHOT), full_page=True)
