"""The browser page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real uvicorn on 127.0.0.1: a user's list, two versions side by side,
a session built from the search box, similar items, errors shown on the page."""

import os
import shutil
from pathlib import Path

import httpx
import pytest
from support import uvicorn_server
from test_api import add_version, shift_embeddings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = ("the browser test needs Debian's Chromium and its driver "
           "(apt-get install chromium chromium-driver; .ci/run installs them)")
# TOWERREC_SCREENSHOTS=docs/images also saves the page's screenshot there (docs/serving.md).
SCREENSHOTS = os.environ.get("TOWERREC_SCREENSHOTS")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -r requirements.txt)")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=MISSING)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    add_version(tiny_export[1] / "1", root, 1)
    add_version(tiny_export[1] / "1", root, 2, edit=shift_embeddings)
    with uvicorn_server(root, root / "server.log", POLL_SECONDS="0") as (url, _):
        yield url


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def texts(driver, selector):
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def test_page_shows_what_the_api_answers(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    api = httpx.Client(base_url=server, timeout=30)
    browser.get(server + "/")
    wait_for(browser, lambda d: "loaded 2, 1" in d.find_element(By.ID, "status").text)

    # A user: the titles shown are the API's, in its order; history newest first.
    user = "u003"
    browser.find_element(By.ID, "user-input").send_keys(user)
    browser.find_element(By.ID, "user-go").click()
    wait_for(browser, lambda d: len(texts(d, "#recs-a li .title")) == 10)
    answer = api.get(f"/recommendations/{user}").json()
    assert texts(browser, "#recs-a li .title") == [
        r["title"] or r["item_id"] for r in answer["recommendations"]]
    history = api.get(f"/users/{user}/history").json()["history"]
    assert texts(browser, "#history li .title") == [h["title"] or h["item_id"]
                                                    for h in history]

    # Two versions side by side, the overlap marked on both sides.
    Select(browser.find_element(By.ID, "compare-version")).select_by_value("1")
    wait_for(browser, lambda d: len(texts(d, "#recs-b li .title")) == 10)
    other = api.get(f"/recommendations/{user}?version=1").json()
    assert [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#recs-b li")] == [r["item_id"] for r in other["recommendations"]]
    both = {r["item_id"] for r in answer["recommendations"]} & {
        r["item_id"] for r in other["recommendations"]}
    marked = {e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#recs-a li.overlap")}
    assert marked == both
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "page.png", Path(SCREENSHOTS) / "page.png")

    # A session from the search box: add two items, recommendations follow.
    search = browser.find_element(By.ID, "search-input")
    search.send_keys("SKU0009")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results button"))
    browser.find_element(By.CSS_SELECTOR, "#search-results button").click()
    wait_for(browser, lambda d: len(texts(d, "#session-recs li")) == 10)
    session = api.post("/recommendations", json={"history": ["SKU0009"]}).json()
    assert [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#session-recs li")] == [r["item_id"] for r in
                                                  session["recommendations"]]

    # Clicking an item shows its similar items.
    browser.find_element(By.CSS_SELECTOR, "#recs-a li .title").click()
    wait_for(browser, lambda d: len(texts(d, "#similar li")) == 10)
    first = answer["recommendations"][0]["item_id"]
    similar = api.get(f"/items/{first}/similar").json()["similar"]
    assert [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#similar li")] == [r["item_id"] for r in similar]

    # An unknown user is a message on the page, not a blank page.
    field = browser.find_element(By.ID, "user-input")
    field.clear()
    field.send_keys("nobody-here")
    browser.find_element(By.ID, "user-go").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "unknown user_id 'nobody-here'" in browser.find_element(By.ID, "error").text


def test_page_shows_new_and_withdrawn_items(browser, server):
    """Items put and withdrawn while serving: listed with their status, the new one found by
    the search box and marked "new" in a list, its similar items a click away."""
    from selenium.webdriver.common.by import By

    api = httpx.Client(base_url=server, timeout=30)
    put = api.put("/items/PAGE-NEW", json={"text": "green lamp item 9", "category": "cat1"})
    assert put.status_code == 200, put.text
    assert api.delete("/items/SKU0011").status_code == 200
    browser.get(server + "/")
    wait_for(browser, lambda d: len(texts(d, "#live-changes li")) == 2)
    rows = browser.find_elements(By.CSS_SELECTOR, "#live-changes li")
    assert [(r.get_attribute("data-item-id"), r.get_attribute("class")) for r in rows] == [
        ("SKU0011", "withdrawn"), ("PAGE-NEW", "new")]
    assert "green lamp item 9" in rows[1].text and "new" in rows[1].text
    search = browser.find_element(By.ID, "search-input")
    search.send_keys("PAGE-NEW")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results button"))
    assert texts(browser, "#search-results li .title") == ["green lamp item 9"]
    browser.find_element(By.CSS_SELECTOR, "#live-changes li.new .title").click()
    wait_for(browser, lambda d: len(texts(d, "#similar li")) == 10)
    similar = api.get("/items/PAGE-NEW/similar").json()["similar"]
    assert [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#similar li")] == [r["item_id"] for r in similar]
    assert "SKU0011" not in [r["item_id"] for r in similar]
    # In a session list, the new item carries its badge.
    field = browser.find_element(By.ID, "session-ids")
    field.send_keys("SKU0001,SKU0002\n")
    wait_for(browser, lambda d: len(texts(d, "#session-recs li")) == 10)
    session = api.post("/recommendations", json={"history": ["SKU0001", "SKU0002"]}).json()
    shown = [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#session-recs li")]
    assert shown == [r["item_id"] for r in session["recommendations"]]
    assert "SKU0011" not in shown
    badges = [e.get_attribute("data-item-id") for e in browser.find_elements(
        By.CSS_SELECTOR, "#session-recs li") if e.find_elements(By.CSS_SELECTOR, ".badge.new")]
    assert badges == [i for i in shown if i == "PAGE-NEW"]


def test_page_says_when_the_server_has_no_model(browser, tmp_path):
    from selenium.webdriver.common.by import By

    empty = tmp_path / "empty"
    empty.mkdir()
    with uvicorn_server(empty, tmp_path / "server.log", ready="/health",
                        POLL_SECONDS="0") as (url, _):
        browser.get(url + "/")
        wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not ready" in browser.find_element(By.ID, "error").text
