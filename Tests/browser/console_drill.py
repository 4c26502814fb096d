#!/usr/bin/python3
"""Drives the Lifeboat console in headless Chromium (Debian's chromium-driver and selenium):
log in, find MACHINE on the dashboard with its RPO state, start a drill from the machine's
page, see it pass with its screenshot, stop it. Keeps a screenshot of the dashboard.

usage: console_drill.py URL USER PASSWORD MACHINE ARTIFACTS_DIR
Exit 0 when every step held; otherwise 1 with the step that failed on stderr."""
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, user, password, machine, artifacts = sys.argv[1:6]
url = url.rstrip("/")


def fail(step, detail=""):
    print(f"console_drill: {step} failed{': ' + detail if detail else ''}", file=sys.stderr)
    try:
        driver.save_screenshot(f"{artifacts}/console-failure.png")
        print(f"console_drill: page at failure: {driver.current_url}\n{driver.find_element(By.TAG_NAME, 'main').text[:2000]}", file=sys.stderr)
    except Exception:
        pass
    sys.exit(1)


def wait_for(step, condition, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.5)
    fail(step, f"not within {timeout} s")


def run_job(action, timeout):
    """Submits the machine page's form for ACTION and waits on the job page for its end."""
    driver.get(f"{url}/machines/{machine}")
    form = driver.find_element(By.ID, f"action-{action}")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(f"{action}: job page", lambda: "/jobs/" in driver.current_url, 15)
    wait_for(f"{action}: job ended", lambda: driver.find_element(By.ID, "job-state").text in ("succeeded", "failed"), timeout)
    state = driver.find_element(By.ID, "job-state").text
    if state != "succeeded":
        fail(f"{action} job", driver.find_element(By.ID, "job-error").text)


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1000"):
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url + "/")
    wait_for("redirect to the login page", lambda: driver.current_url.endswith("/login"), 10)
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait_for("dashboard after login", lambda: driver.find_element(By.ID, "machines").is_displayed(), 15)

    row = driver.find_element(By.ID, f"machine-{machine}")
    rpo = row.find_element(By.CSS_SELECTOR, ".rpo")
    if "compliant" not in rpo.text or "ok" not in rpo.get_attribute("class"):
        fail("RPO state on the dashboard", f"'{rpo.text}' ({rpo.get_attribute('class')})")
    if "Standby" not in row.text:
        fail("machine state on the dashboard", row.text)
    driver.save_screenshot(f"{artifacts}/console-dashboard.png")

    run_job("test-failover", 240)
    driver.get(f"{url}/machines/{machine}")
    drill = driver.find_element(By.CSS_SELECTOR, "article.drill")
    if "passed" not in drill.find_element(By.CSS_SELECTOR, ".badge").text:
        fail("drill result on the machine page", drill.text)
    image = drill.find_element(By.CSS_SELECTOR, "img.screenshot")
    wait_for("drill screenshot loaded", lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0, 10)
    if driver.find_element(By.ID, "state").text != "TestingFailover":
        fail("state while the drill runs", driver.find_element(By.ID, "state").text)
    driver.save_screenshot(f"{artifacts}/console-drill.png")

    run_job("stop-test", 120)
    driver.get(f"{url}/machines/{machine}")
    if driver.find_element(By.ID, "state").text != "Standby":
        fail("state after stop-test", driver.find_element(By.ID, "state").text)
    print("console_drill: logged in, dashboard, drill passed with its screenshot, stopped")
finally:
    driver.quit()
