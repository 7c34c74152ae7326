"""A real headless Chromium driven by selenium, for the Web UI tests (and bench/webui.py).

One fresh ``--user-data-dir`` per browser; ``quit()`` ends chromedriver and every Chromium
process it started. Console messages are collected so a test can assert that no script
error and no Content-Security-Policy violation happened.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--disable-extensions", "--password-store=basic", "--lang=en-US"]


class Browser:
    def __init__(self, width: int = 1280, height: int = 900, download_dir: Path | None = None):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="portunus-chromium-"))
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or CHROMIUM
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.add_argument(f"--window-size={width},{height}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.download_dir = Path(download_dir or self.profile / "downloads")
        opts.add_experimental_option("prefs", {"download.default_directory": str(self.download_dir),
                                               "download.prompt_for_download": False})
        service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER)
        self.driver = webdriver.Chrome(service=service, options=opts)
        self.driver.set_page_load_timeout(20)
        self.driver.set_script_timeout(20)
        self.driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow",
                                                                 "downloadPath": str(self.download_dir)})
        self.console: list[dict] = []

    # ---- console -------------------------------------------------------------------------
    def drain_console(self) -> list[dict]:
        try:
            self.console.extend(self.driver.get_log("browser"))
        except Exception:  # noqa: BLE001 - a closed window has no log; nothing to collect
            pass
        return self.console

    def csp_violations(self) -> list[str]:
        return [m["message"] for m in self.drain_console() if "Content Security Policy" in m["message"]
                or "Content-Security-Policy" in m["message"]]

    def script_errors(self) -> list[str]:
        # failed API calls the UI handles (401/403/404/409/422 …) are logged by Chromium as network errors;
        # only uncaught exceptions and CSP refusals are bugs
        out = []
        for m in self.drain_console():
            if m.get("level") != "SEVERE":
                continue
            text = m["message"]
            if "Failed to load resource" in text or "/v1/" in text and "status of" in text:
                continue
            out.append(text)
        return out

    # ---- helpers ---------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self.driver.get(url)

    def find(self, css: str, timeout: float = 10.0, visible: bool = True):
        from selenium.webdriver.support.ui import WebDriverWait
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.common.by import By

        cond = EC.visibility_of_element_located if visible else EC.presence_of_element_located
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(cond((By.CSS_SELECTOR, css)))

    def finds(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, pred, timeout: float = 10.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = pred()
            except AssertionError:
                raise
            except Exception:  # noqa: BLE001 - a stale element while the page re-renders: ask again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; url={self.driver.current_url}\n"
                                     f"page: {self.page_text()[:1500]}\nconsole: {self.script_errors()[-5:]}")
            time.sleep(0.05)

    def wait_text(self, css: str, text: str, timeout: float = 10.0):
        return self.wait(lambda: text in self.find(css, timeout).text, timeout, f"{text!r} in {css}")

    def fill(self, css: str, value: str) -> None:
        el = self.find(css)
        el.clear()
        el.send_keys(value)

    def field(self, name: str, scope: str = ""):
        """The input of the labelled field ``name`` (the data-field of dom.field)."""
        return self.find(f'{scope} [data-field="{name}"] input, {scope} [data-field="{name}"] select'.strip())

    def set_field(self, name: str, value: str, scope: str = "") -> None:
        from selenium.webdriver.support.ui import Select
        el = self.field(name, scope)
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        else:
            el.clear()
            el.send_keys(value)

    def field_error(self, name: str, scope: str = "") -> str:
        el = self.find(f'{scope} [data-field="{name}"] .field-error'.strip(), visible=False)
        return el.text if el.is_displayed() else ""

    def click(self, css: str) -> None:
        self.press(self.find(css))

    def press(self, el, timeout: float = 5.0) -> None:
        """Click like a person: scrolled to the middle of the screen; a notice still on top passes, so wait."""
        from selenium.common.exceptions import ElementClickInterceptedException

        deadline = time.monotonic() + timeout
        while True:
            self.js("arguments[0].scrollIntoView({block: 'center', inline: 'nearest'})", el)
            try:
                el.click()
                return
            except ElementClickInterceptedException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def click_text(self, text: str, css: str = "button", scope=None, timeout: float = 10.0):
        def pick():
            root = scope or self.driver
            from selenium.webdriver.common.by import By
            for el in root.find_elements(By.CSS_SELECTOR, css):
                if el.is_displayed() and el.text.strip() == text:
                    return el
            return None
        el = self.wait(pick, timeout, f"{css} with text {text!r}")
        self.press(el)
        return el

    def page_text(self) -> str:
        try:
            return self.js("return document.body.innerText")
        except Exception:  # noqa: BLE001 - only for a failure message
            return "?"

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def js_async(self, script: str, *args):
        return self.driver.execute_async_script(script, *args)

    def path(self) -> str:
        return self.js("return location.pathname")

    def screenshot(self, path: Path, max_height: int = 2000) -> None:
        """The whole page (up to ``max_height`` CSS px), without the passing corner notices."""
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        self.js("const f = document.getElementById('flash'); if (f) f.style.visibility = 'hidden'")
        try:
            width, height = self.js("return [innerWidth, Math.max(innerHeight, document.documentElement.scrollHeight)]")
            shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, max_height), "scale": 1}})
            path.write_bytes(base64.b64decode(shot["data"]))
        finally:
            self.js("const f = document.getElementById('flash'); if (f) f.style.visibility = ''")

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
