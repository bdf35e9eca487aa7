"""sentinel's status page in a real browser: Debian's headless Chromium driven by selenium against `sentinel
up` (its replica, Prometheus, rules and runbooks). It loads the page, signs in with the API token, adds a
silence and approves an action with the page's own forms, and checks each against sentinel's JSON API and its
state database. SENTINEL_SCREENSHOTS=DIR keeps the screenshots (docs/img/ has those of a run)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentinel.alerts.store import Store
from tests.conftest import Receiver
from tests.integration.test_end_to_end import run_sentinel, wait_for

pytestmark = pytest.mark.integration
TOKEN = "status-page-operator-token-0123456789"
PROBE = """groups:
  - name: probe
    interval: 1s
    rules:
      - alert: StatusPageProbe
        expr: vector(1)
        labels: {severity: warning, replica: replica-0}
        annotations: {summary: "a probe alert, always firing, for the status page's test"}
        sentinel: {runbook: cuda-error}
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)  # no selenium-manager: no network
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def submit(driver: Any, button: Any, then: Any) -> None:
    """Press a form's button and wait until the page it leads to is loaded and ``then(driver)`` holds (a click
    returns before the navigation it starts has finished)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def gone(_: Any) -> bool:
        # ``expected_conditions.staleness_of`` waits for StaleElementReferenceException only. Chromium, asked
        # about a node while the navigation detaches it, may answer "Node with given id does not belong to
        # the document" instead (a CI run failed on that): the button is gone either way
        try:
            button.is_enabled()
        except WebDriverException:
            return True
        return False

    button.click()
    WebDriverWait(driver, 15).until(gone)
    # the new page may still be replacing the old while the condition reads it: such an error is read again
    WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState") == "complete" and then(d))


def shot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = os.environ.get("SENTINEL_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


def test_status_page_in_a_browser(tmp_path: Path, receiver: Receiver, tiny_model_dir: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    with run_sentinel(tmp_path, receiver, tiny_model_dir, extra_rules={"probe.yaml": PROBE},
                      api={"token": TOKEN}) as (proc, up, log):
        api = up["api"]
        store = Store(tmp_path / "state" / "sentinel.db")
        store.request_approval("e2e0approval", {"incident": "CudaError/x/1", "rule": "CudaError",
                                                "action": "reset_gpu", "target": "replica-0",
                                                "why": "two restarts within the hour did not clear it"}, time.time())

        def probe_with_findings() -> bool:
            alerts = httpx.get(f"{api}/api/v1/alerts").json()["data"]["alerts"]
            return any(a["labels"]["alertname"] == "StatusPageProbe" and a["state"] == "firing" and "findings" in a
                       for a in alerts)

        wait_for("the probe alert firing with its runbook's findings", probe_with_findings, 90, proc, log)
        browser.get(f"{api}/")
        page = browser.page_source
        assert "StatusPageProbe" in page and "a probe alert, always firing" in page
        assert "replica-0" in browser.find_element(By.ID, "services").text
        assert "healthy" in browser.find_element(By.ID, "services").text
        assert "e2e0approval" in browser.find_element(By.ID, "remediation").text
        assert not browser.find_elements(By.XPATH, "//button[text()='Approve']")  # no buttons before signing in
        shot(browser, tmp_path, "status-page.png")

        submit(browser, browser.find_element(By.XPATH, "//button[text()='Sign in to act']"),
               lambda d: d.find_elements(By.NAME, "token"))
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        submit(browser, browser.find_element(By.XPATH, "//button[text()='Sign in']"),
               lambda d: "Sign out" in d.page_source)

        browser.find_element(By.XPATH, "//summary[text()='Add a silence']").click()
        form = browser.find_element(By.ID, "add-silence")
        form.find_element(By.NAME, "matchers").send_keys('alertname="StatusPageProbe"')
        duration = form.find_element(By.NAME, "duration")
        duration.clear()
        duration.send_keys("30m")
        form.find_element(By.NAME, "comment").send_keys("browser test")
        submit(browser, form.find_element(By.XPATH, ".//button[text()='Add silence']"),
               lambda d: "StatusPageProbe" in d.find_element(By.ID, "silences").text)
        silences = httpx.get(f"{api}/api/v1/silences").json()["data"]["silences"]
        assert [(s["matchers"], s["comment"]) for s in silences] == [(['alertname="StatusPageProbe"'],
                                                                      "browser test")]
        assert silences[0]["createdBy"].startswith("key:") and 1790 < silences[0]["endsAt"] - time.time() <= 1800
        assert 'alertname="StatusPageProbe"' in browser.find_element(By.ID, "silences").text

        row = browser.find_element(By.ID, "approval-e2e0approval")
        submit(browser, row.find_element(By.XPATH, ".//button[text()='Approve']"),
               lambda d: "approved by" in d.find_element(By.ID, "approval-e2e0approval").text)
        [doc] = store.approvals()
        assert doc["status"] == "approved" and doc["decided_by"].startswith("key:")
        audit = httpx.get(f"{api}/api/v1/actions").json()["data"]["audit"]
        assert any(e["kind"] == "approval" and e.get("status") == "approved" for e in audit)
        assert "approved by key:" in browser.find_element(By.ID, "approval-e2e0approval").text
        shot(browser, tmp_path, "status-page-signed-in.png")

        submit(browser, browser.find_element(By.XPATH, "//button[text()='Expire']"),
               lambda d: "no active silences" in d.find_element(By.ID, "silences").text)
        [ended] = httpx.get(f"{api}/api/v1/silences").json()["data"]["silences"]
        assert ended["endsAt"] <= time.time()
        assert "no active silences" in browser.find_element(By.ID, "silences").text

        # a form posted from elsewhere (no CSRF token), with the browser's session cookie: refused
        cookie = {c["name"]: c["value"] for c in browser.get_cookies()}
        r = httpx.post(f"{api}/ui/silences", cookies=cookie, data={"matchers": 'a="b"', "duration": "1h",
                                                                      "comment": "forged"})
        assert r.status_code == 403 and len(httpx.get(f"{api}/api/v1/silences").json()["data"]["silences"]) == 1
        store.close()
