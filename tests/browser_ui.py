"""The ComfyUI frontend in a real browser: Debian's Chromium driven by Playwright (sync API).

Used by ``tests/test_browser.py``. Chromium comes from apt (``scripts/bootstrap.sh``), never from
Playwright's own browser download.

:class:`Frontend` wraps one page on a running :class:`harness.ComfyServer`: it waits for the app,
loads UI-format workflows as the Workflow menu does, clicks Run, takes screenshots, and collects
console and page errors, of which :func:`is_host_noise` drops the few the host itself logs on a
machine with no network and a fresh user directory (they appear with no custom nodes at all).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM = os.environ.get("TDD_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1600, "height": 1000}
READY_JS = "() => !!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)"
# Frontend 1.49 tells of a node type the server lacks with an error overlay "Missing node: <type>"
# (1.32 used a dialog, [role=dialog][aria-labelledby="global-missing-nodes"]); its X closes it.
ERROR_OVERLAY = "[data-testid=error-overlay]"
ERROR_OVERLAY_DISMISS = "[data-testid=error-overlay-dismiss]"
MISSING_NODE_NOTICE = re.compile(r"^Missing node: ")
TEMPLATES_DIALOG = '[role=dialog][aria-labelledby="global-workflow-template-selector"]'
ERROR_DIALOG = '[role=dialog][aria-labelledby="global-error"]'
SEARCH_PLACEHOLDER = "Add a node..."  # the node search box (frontend 1.49; 1.32: "Search Nodes...")
# What a failure report records of the page: open dialogs, toasts, the element on top at the
# canvas centre (what a click there would hit) and the focused element.
UI_STATE_JS = """() => {
    const describe = (el) => el ? `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}${
        typeof el.className === 'string' && el.className ? '.' + el.className.trim().split(/\\s+/).slice(0, 4).join('.') : ''}` : null;
    const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const canvas = document.getElementById('graph-canvas');
    const r = canvas ? canvas.getBoundingClientRect() : null;
    const onTop = (fx, fy) => r ? describe(document.elementFromPoint(r.left + r.width * fx, r.top + r.height * fy)) : null;
    return {
        dialogs: [...document.querySelectorAll('[role=dialog]')].filter(visible)
            .map(d => d.getAttribute('aria-labelledby') || describe(d)),
        toasts: [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText.slice(0, 120)),
        on_top_at_centre: onTop(0.5, 0.5),
        on_top_at_search_spot: onTop(0.45, 0.6),
        active_element: describe(document.activeElement),
        canvas_rect: r ? [r.left, r.top, r.width, r.height] : null,
        nodes: window.app?.graph?.nodes?.length ?? null,
    };
}"""


@dataclass(frozen=True)
class ConsoleEntry:
    kind: str   # "error" (console.error) or "pageerror" (uncaught exception)
    text: str
    url: str    # the console message's location (for a failed resource: its URL)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text.splitlines()[0] if self.text else ''} ({self.url})"


# (message start, URL pattern or None, message must also contain). Each names one known host noise.
_NOT_FOUND = "Failed to load resource: the server responded with a status of 404"
HOST_NOISE = (
    # A fresh user directory has no user.css, favicon, saved workflows/subgraphs or template index.
    (_NOT_FOUND, re.compile(r"^https?://[^/]+/(api/userdata/)?user\.css$"), ""),
    (_NOT_FOUND, re.compile(r"^https?://[^/]+/favicon\.ico$"), ""),
    (_NOT_FOUND, re.compile(r"^https?://[^/]+/api/userdata\?dir=(workflows|subgraphs|subgraphs%2F)&"), ""),
    (_NOT_FOUND, re.compile(r"^https?://[^/]+/api/userdata/comfy\.templates\.json$"), ""),
    # The online registry / release API is unreachable from test machines.
    ("Failed to load resource: net::ERR_NAME_NOT_RESOLVED", re.compile(r"^https://api\.comfy\.org/"), ""),
    # Frontend 1.49 checks the model links of its default workflow (Z-Image Turbo) on Hugging Face.
    ("Failed to load resource: net::ERR_NAME_NOT_RESOLVED", re.compile(r"^https://huggingface\.co/"), ""),
    # comfyui-frontend-package 1.49.6 at boot (ComfyUI 0.33.0), with no custom node installed too.
    ("ComfyApp graph accessed before initialization", re.compile(r"^https?://[^/]+/assets/[^/]+\.js$"), ""),
    # comfyui-frontend-package 1.32.9 at boot, with or without custom nodes.
    ("TypeError: Cannot read properties of undefined (reading 'id')", None, "at onChange ("),
)


def is_host_noise(entry: ConsoleEntry) -> bool:
    """Whether ``entry`` is one of the host's own known messages (see ``HOST_NOISE``)."""
    for start, url_pattern, contains in HOST_NOISE:
        if (entry.kind == "error" and entry.text.startswith(start) and contains in entry.text
                and (url_pattern is None or url_pattern.search(entry.url))):
            return True
    return False


def missing_input_image(entry: ConsoleEntry, filenames) -> bool:
    """A 404 preview of an input image the loaded workflow names (the user supplies it, as a model)."""
    if entry.kind != "error" or not entry.text.startswith(_NOT_FOUND):
        return False
    return any(re.search(r"/api/view\?type=input&filename=" + re.escape(name) + r"&", entry.url) for name in filenames)


def launch(playwright):
    """Debian's Chromium, headless; a clear error when it is not installed."""
    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"no Chromium at {CHROMIUM}: run scripts/bootstrap.sh (apt-get install chromium) "
                                "or set TDD_CHROMIUM")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def new_context(browser, returning_user: bool = True):
    """A browser context (its own local storage) at VIEWPORT. A returning user has dismissed the
    "Introducing Nodes 2.0" banner (the frontend keeps that in local storage); a first-time user sees it."""
    context = browser.new_context(viewport=VIEWPORT)
    if returning_user:
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    return context


class Frontend:
    """One browser page on the ComfyUI server at ``url``; screenshots go to ``shots``."""

    def __init__(self, context, url: str, shots: Path):
        self.page = context.new_page()
        self.url = url
        self.shots = Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.console: list[ConsoleEntry] = []
        self.console_log: list[str] = []  # every console message and page error, for a failure's report
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_pageerror)

    def _on_console(self, msg) -> None:
        url = (msg.location or {}).get("url", "")
        self.console_log.append(f"{time.strftime('%H:%M:%S')} [{msg.type}] {msg.text} ({url})")
        if msg.type == "error":
            self.console.append(ConsoleEntry("error", msg.text, url))

    def _on_pageerror(self, err) -> None:
        self.console_log.append(f"{time.strftime('%H:%M:%S')} [pageerror] {err}")
        self.console.append(ConsoleEntry("pageerror", str(err), ""))

    def write_failure_report(self, name: str) -> list[Path]:
        """A screenshot and the page's console log, ``<name>.png`` / ``<name>.console.txt`` in the
        screenshot folder: what a CI failure is read from."""
        written = []
        log_path = self.shots / f"{name}.console.txt"
        state = ""
        try:
            state = json.dumps(self.js(UI_STATE_JS), indent=1)
        except Exception as exc:  # the page may be gone; the log is still worth writing
            state = f"(UI state unavailable: {exc})"
        log_path.write_text(f"UI state at failure:\n{state}\n\nConsole:\n" + "\n".join(self.console_log) + "\n")
        written.append(log_path)
        try:
            written.append(self.shot(name))
        except Exception as exc:
            log.warning("no failure screenshot for %s: %s", name, exc)
        return written

    # -- app ---------------------------------------------------------------------------------------
    def open(self, timeout_s: float = 90.0) -> "Frontend":
        """Load the app and wait until its graph and canvas exist."""
        self.page.goto(self.url, timeout=timeout_s * 1000)
        self.page.wait_for_function(READY_JS, timeout=timeout_s * 1000)
        return self

    def settle(self, timeout_ms: float = 10_000) -> None:
        """Bring the page to the known state a test starts from: no node search box, no dialog, no
        toast, nothing selected, keyboard focus on the canvas. Raises when a dialog will not close."""
        search = self.page.get_by_placeholder(SEARCH_PLACEHOLDER)
        if search.count() and search.first.is_visible():
            search.first.fill("")  # closing it with text typed makes the frontend log an error of its own
        for _ in range(5):  # a dialog can open another on close (the search box, a confirmation)
            if not self.open_dialogs():
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)
        if self.open_dialogs():
            raise AssertionError(f"dialogs still open after Escape: {self.open_dialogs()}")
        for close in self.page.locator(ERROR_OVERLAY_DISMISS).all():  # as a user closes them: the X
            close.click()
        self.page.locator(ERROR_OVERLAY).first.wait_for(state="detached", timeout=timeout_ms)
        self.js("""() => { app.extensionManager.toast.removeAll(); app.canvas.deselectAll();
                          app.canvas.canvas.focus(); }""")
        self.page.wait_for_function("() => document.querySelectorAll('.p-toast-message').length === 0",
                                    timeout=timeout_ms)

    def open_dialogs(self) -> list[str]:
        return self.js("""() => [...document.querySelectorAll('[role=dialog]')]
            .filter(d => d.offsetWidth || d.offsetHeight || d.getClientRects().length)
            .map(d => d.getAttribute('aria-labelledby') || d.className)""")

    def double_click(self, x: float, y: float, interval_ms: float = 80.0, delivery_gap_s: float = 0.0) -> None:
        """A user's double-click at page point (x, y), stamped with the time the clicks happen.

        The canvas takes two presses as a double-click when their events' timestamps are less than
        Comfy.Pointer.DoubleClickTime (300 ms) apart. A person's clicks carry the time the input
        happened. Playwright's ``dblclick`` sends four events one after another from its driver
        process, and the browser stamps each when it arrives: on a loaded machine (the full suite on
        2 cores, the server computing beside it) the driver can be descheduled between them, the
        presses arrive more than 300 ms apart and nothing opens. Here the events go through the
        DevTools protocol with their own timestamps, ``interval_ms`` apart, whenever they arrive;
        ``delivery_gap_s`` delays the second click's delivery as such a machine would (for the test)."""
        cdp = self.page.context.new_cdp_session(self.page)
        try:
            t0 = time.time()
            for i, (kind, count) in enumerate([("mousePressed", 1), ("mouseReleased", 1),
                                               ("mousePressed", 2), ("mouseReleased", 2)]):
                if i == 2 and delivery_gap_s:
                    time.sleep(delivery_gap_s)
                cdp.send("Input.dispatchMouseEvent", {
                    "type": kind, "x": x, "y": y, "button": "left", "buttons": 1 if kind == "mousePressed" else 0,
                    "clickCount": count, "timestamp": t0 + (i // 2) * interval_ms / 1000 + (i % 2) * 0.01})
        finally:
            cdp.detach()

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def problems(self, allow=lambda entry: False, settle_s: float = 0.5) -> list[str]:
        """Console errors and page errors since the last call that are neither host noise nor
        ``allow``-ed; the collected messages are cleared."""
        # (the sync API delivers page events only while it is called: wait through it, not time.sleep)
        self.page.wait_for_timeout(settle_s * 1000)
        entries, self.console = self.console, []
        return [str(e) for e in entries if not is_host_noise(e) and not allow(e)]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    # -- graph -------------------------------------------------------------------------------------
    def load_workflow(self, workflow: dict, name: str) -> None:
        """Open a UI-format workflow as the Workflow menu does (a new tab named ``name``)."""
        self.js("([wf, name]) => app.loadGraphData(wf, true, true, name)", [workflow, name])
        self.fit_view()

    def fit_view(self) -> None:
        """Zoom to fit the whole graph (View > Zoom to fit) for the screenshots."""
        self.js("async () => { app.canvas.deselectAll(); await app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        self.page.wait_for_timeout(500)  # the zoom is animated

    def missing_node_notices(self):
        """The "Missing node: <type>" error overlays (a locator)."""
        return self.page.locator(ERROR_OVERLAY).filter(has_text=MISSING_NODE_NOTICE)

    def node_types(self) -> list[str]:
        return self.js("() => app.graph.nodes.map(n => n.type)")

    def unregistered_types(self) -> list[str]:
        return self.js("() => app.graph.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types))")

    def nodes_with_errors(self) -> list[str]:
        return self.js("() => app.graph.nodes.filter(n => n.has_errors).map(n => `${n.id} ${n.type}`)")

    def set_widgets(self, node_type: str, values: dict) -> None:
        """Set widget values of the (single) node of ``node_type`` as its widget callbacks would."""
        self.js("""([type, values]) => {
            const node = app.graph.nodes.find(n => n.type === type);
            for (const [name, value] of Object.entries(values)) {
                const w = node.widgets.find(w => w.name === name);
                w.value = value;
                w.callback?.(value, app.canvas, node);
            }
            app.graph.setDirtyCanvas(true, true);
        }""", [node_type, values])

    # -- running -----------------------------------------------------------------------------------
    def _queued(self, click) -> tuple[int, dict]:
        """Do ``click`` and return the status and JSON of the POST /prompt it sends."""
        is_prompt = lambda r: r.request.method == "POST" and r.url.rstrip("/").endswith("/prompt")
        with self.page.expect_response(is_prompt, timeout=60_000) as info:
            click()
        response = info.value
        try:
            body = response.json()
        except (ValueError, json.JSONDecodeError):
            body = {"raw": response.text()}
        return response.status, body

    def click_run(self) -> tuple[int, dict]:
        """Press the Run button -> (status, JSON) of the POST /prompt it sends."""
        return self._queued(lambda: self.page.get_by_test_id("queue-button").click())

    def click_node_title(self, title: str) -> None:
        """Click the title bar of the node titled ``title`` (selects it)."""
        x, y = self.js("""(title) => { const n = app.graph.nodes.find(n => n.title === title);
            const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
            return [rect.left + (n.pos[0] + 40 + ds.offset[0]) * ds.scale,
                    rect.top + (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2 + ds.offset[1]) * ds.scale]; }""", title)
        self.page.mouse.click(x, y)

    def until_shown(self, act, shown, attempts: int = 3, wait_ms: float = 5000, last_wait_ms: float = 30_000) -> None:
        """Do ``act`` (a user's click) until the locator ``shown`` appears, as a user tries again when a
        click does nothing: on a busy page, or right after another interaction, frontend 1.49 can take
        the first click as the end of what came before. Raises when the last attempt shows nothing."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        for attempt in range(attempts):
            act()
            last = attempt == attempts - 1
            try:
                shown.wait_for(timeout=last_wait_ms if last else wait_ms)
                return
            except PlaywrightTimeoutError:
                if last:
                    raise

    def run_selected_output(self, title: str) -> tuple[int, dict]:
        """Select the output node titled ``title`` and press the run button of the selection
        toolbox that appears over it (runs only that output's branch)."""
        button = self.page.locator(".selection-toolbox button:has(i[class*='lucide--play'])")
        self.until_shown(lambda: self.click_node_title(title), button)
        return self._queued(lambda: button.click())

    def output_images(self, node_type: str = "SaveImage") -> list[dict]:
        """The images the UI shows on the nodes of ``node_type``: src and loaded natural size."""
        return self.js("""(type) => app.graph.nodes.filter(n => n.type === type).flatMap(n =>
            (n.imgs || []).map(img => ({node: n.id, title: n.title, src: img.src, complete: img.complete,
                                        width: img.naturalWidth, height: img.naturalHeight})))""", node_type)
