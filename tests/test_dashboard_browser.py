"""The coordinator dashboard in a real headless Chromium, over a real federation on loopback.

One federation for the module (a SuperLink and 3 site daemons, TLS, site
authentication), one dashboard and one browser; the tests run in order: 3 sites
online, their medfed version not reported yet; a run's round counter advances while
it trains, and then each site's version is the one its replies reported; a refused
run shows its rule; a stopped site turns offline at once, and a killed one (site daemon
and SuperNode SIGKILLed together, as in a power cut) within its heartbeat period: the
sites declare a 10 s heartbeat (``heartbeat_interval_s``, Flower's shortest), so the
SuperLink counts a silent site offline after 2 x 10 s.

Needs Debian's chromium and chromium-driver (`make chromium` installs them); the
driver is given explicitly and SE_OFFLINE is set, so Selenium never downloads one.
Screenshots go to the test's temporary folder (``MEDFED_SCREENSHOT_DIR``: there too).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from medfed.core.config import RunConfig
from medfed.core.schema import medfed_version
from medfed.core.web import Bind, Dashboard
from medfed.local import LocalFederation
from medfed.server.dashboard.http import CoordinatorDashboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or not os.path.exists(CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromedriver): "
        "`make chromium` installs them",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra)")
By = pytest.importorskip("selenium.webdriver.common.by").By

SITES = ["site-a", "site-b", "site-c"]
HEARTBEAT_S = 10.0
OFFLINE_AFTER_S = 2 * HEARTBEAT_S  # Flower's patience: two missed heartbeats


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def fed() -> Iterator[LocalFederation]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mf-dash-", dir="/tmp"))  # short: Unix sockets
    federation = LocalFederation(root, SITES, name="dash", heartbeat_interval_s=HEARTBEAT_S)
    try:
        with federation:
            federation.create(site_data=lambda i, name: {"num_samples": 16})
            federation.start()
            yield federation
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(fed: LocalFederation) -> Iterator[Dashboard]:
    app = CoordinatorDashboard(fed.fed, refresh_s=0.5, poll_s=0.5)
    with Dashboard(Bind(port=0), app) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "1"  # Selenium Manager: never download a driver
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check: Callable[[], object], timeout: float) -> object:
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - the DOM is swapped under us
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def cell(driver: object, selector: str) -> str:
    """The text of ``selector``, read again when the page's poll replaced the element."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return driver.find_element(By.CSS_SELECTOR, selector).text  # type: ignore[attr-defined]
        except StaleElementReferenceException:  # swapped between the find and the read
            time.sleep(0.05)
    return driver.find_element(By.CSS_SELECTOR, selector).text  # type: ignore[attr-defined]


def shot(driver: object, shots: Path, name: str) -> Path:
    path = shots / name
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    if os.environ.get("MEDFED_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["MEDFED_SCREENSHOT_DIR"]) / name)
    return path


def test_three_sites_online(browser: object, dashboard: Dashboard, shots: Path) -> None:
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    wait_for("3 sites online", lambda: cell(browser, "#online-count") == "3", 30)
    for site in SITES:
        assert cell(browser, f"tr[data-site='{site}'] td.status") == "online"
        # no run yet: no reply has told the server which medfed a site runs
        assert cell(browser, f"tr[data-site='{site}'] td.version") == "not reported"
    assert shot(browser, shots, "sites.png").stat().st_size > 10_000


def test_round_counter_advances_while_the_run_trains(
    browser: object, dashboard: Dashboard, fed: LocalFederation, shots: Path
) -> None:
    with fed.control() as control:
        run_id = control.submit(
            RunConfig(task="tiny-seg", rounds=2, min_sites=3, round_timeout_s=60)
        )
    row = f"tr[data-run='{run_id}']"
    seen: list[str] = []
    browser.execute_script("window.medfedMark = 42")  # type: ignore[attr-defined]

    def finished() -> bool:
        text = cell(browser, f"{row} td.round")
        if not seen or seen[-1] != text:
            seen.append(text)
        return cell(browser, f"{row} td.status") == "completed"

    wait_for(f"run {run_id} completed", finished, 120)
    finished()  # the round cell once more: the table may have been swapped between reads
    # the page was not reloaded: the counter moved under the browser's eyes
    assert browser.execute_script("return window.medfedMark") == 42  # type: ignore[attr-defined]
    assert seen[-1] == "2/2"
    assert len(seen) >= 2 and seen == sorted(seen), seen
    assert "survived" in cell(browser, row)
    # each site's replies carried its medfed version; the sites table shows it
    wait_for(
        "every site's version",
        lambda: all(
            cell(browser, f"tr[data-site='{s}'] td.version") == medfed_version() for s in SITES
        ),
        10,
    )
    shot(browser, shots, "dashboard.png")
    # the run's page: per-site charts (uPlot) and secure aggregation per round
    browser.get(dashboard.url + f"run/{run_id}")  # type: ignore[attr-defined]
    wait_for("charts drawn", lambda: len(browser.find_elements(By.CSS_SELECTOR, ".uplot")) >= 2, 20)
    wait_for(
        "2 rounds of secure aggregation", lambda: cell(browser, "#secagg").count("site-a") >= 2, 20
    )
    shot(browser, shots, "run.png")


def test_a_refused_run_shows_its_rule(
    browser: object, dashboard: Dashboard, fed: LocalFederation, shots: Path
) -> None:
    with fed.control() as control:  # less noise than every site's policy allows
        run_id = control.submit(
            RunConfig(
                task="tiny-seg",
                rounds=2,
                min_sites=2,
                round_timeout_s=60,
                privacy={"mode": "sample", "noise_multiplier": 0.3, "max_grad_norm": 1.0},
            )
        )
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    row = f"tr[data-run='{run_id}']"
    wait_for("refused", lambda: cell(browser, f"{row} td.status") == "refused", 90)
    notes = cell(browser, f"{row} td.notes")
    assert "privacy.datasets.default.min_noise_multiplier" in notes
    assert all(f"{s} refused" in notes for s in SITES)
    shot(browser, shots, "refused.png")


def test_a_stopped_site_turns_offline_at_once(
    browser: object, dashboard: Dashboard, fed: LocalFederation, shots: Path
) -> None:
    site_c = next(p for p in fed.group.members if p.name == "site daemon site-c")
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    wait_for("3 online", lambda: cell(browser, "#online-count") == "3", 30)
    t0 = time.monotonic()
    site_c.stop()  # SIGTERM to its process group: the SuperNode signs off
    wait_for(
        "site-c offline",
        lambda: cell(browser, "tr[data-site='site-c'] td.status") == "offline",
        10,
    )
    assert time.monotonic() - t0 <= 10
    assert cell(browser, "#online-count") == "2"
    assert cell(browser, "tr[data-site='site-a'] td.status") == "online"
    shot(browser, shots, "offline.png")


def test_a_killed_site_turns_offline_within_the_heartbeat_period(
    browser: object, dashboard: Dashboard, fed: LocalFederation, shots: Path
) -> None:
    daemon = next(p for p in fed.group.members if p.name == "site daemon site-b")
    assert daemon.proc is not None
    supernodes = _children(daemon.proc.pid)
    assert supernodes, "site-b's daemon has no SuperNode process"
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    wait_for(
        "site-b online", lambda: cell(browser, "tr[data-site='site-b'] td.status") == "online", 10
    )
    # The SuperNode's group first (it runs in its own session), then the daemon before
    # it could start another: nothing signs off.
    t0 = time.monotonic()
    for pid in supernodes:
        os.killpg(pid, signal.SIGKILL)
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    assert cell(browser, "tr[data-site='site-b'] td.status") == "online"  # not signed off
    wait_for(
        "site-b offline",
        lambda: cell(browser, "tr[data-site='site-b'] td.status") == "offline",
        OFFLINE_AFTER_S + 10,
    )
    took = time.monotonic() - t0
    # the SuperLink's deadline is the last heartbeat (0-4 s before the kill) + 2 x 10 s;
    # the page polls every 0.5 s; slack for a loaded machine's browser
    print(f"site-b offline {took:.1f} s after the SIGKILL")
    assert took <= OFFLINE_AFTER_S + 5, took
    assert cell(browser, "#online-count") == "1"
    assert f"{OFFLINE_AFTER_S:.0f} s" in cell(browser, "#sites")  # the period is on the page
    shot(browser, shots, "killed.png")


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
