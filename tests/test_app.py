"""The web app (radz/app.py): its scoring function, and the real thing in headless Chromium.

The browser test starts `python -m radz.app` on a tiny checkpoint, uploads RG1_UNCR.dcm (pydicom-data) through the
page, presses Classify, reads the scores off the page and checks them against the pipeline's; it saves a
screenshot (to $RADZ_APP_SCREENSHOT as well, when set). It needs Debian's Chromium and chromedriver (`make browser`,
which `make test` runs): without them it FAILS, it does not skip.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from transformers import pipeline

from conftest import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LABELS = ["Cardiomegaly", "Pleural Effusion", "Nodule"]
DICOM = get_testdata_file("RG1_UNCR.dcm", download=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a (hand-made) calibration for two of the three labels."""
    directory = tmp_path_factory.mktemp("app") / "checkpoint"
    shutil.copytree(tiny_checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    config["calibration"] = {
        "method": "platt",
        "settings": {"use_knowledge": True, "templates": [config["label_template"]], "negative_template": "no {}"},
        "labels": {"Cardiomegaly": {"scale": 0.5, "bias": -1.0}, "Nodule": {"scale": 2.0, "bias": 0.3}},
        "fitted_on": "hand-made, for the test",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def pipeline_scores(clf, image) -> dict:
    results = clf(image, candidate_labels=LABELS, multi_label=True, calibrated=True)
    return {result["label"]: result["score"] for result in results}


def test_classify_images_studies_and_warnings(checkpoint, tmp_path):
    from radz.app import RadZApp, parse_labels

    app = RadZApp(str(checkpoint))
    assert parse_labels("Cardiomegaly, Nodule\n\nPleural Effusion") == LABELS[:1] + ["Nodule", "Pleural Effusion"]
    with pytest.raises(ValueError, match="at least one candidate label"):
        parse_labels(" ,\n")

    # A PNG: scores, one overlay per label, calibrated scores named as such.
    png = tmp_path / "phantom.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 50), dtype=np.uint8)).save(png)
    table, gallery, notes = app.classify([str(png)], "\n".join(LABELS))
    assert table.count("<tr data-file") == 3 and len(gallery) == 3 and "Platt-calibrated" in notes
    assert "Not calibrated (no fit for them): Pleural Effusion." in notes
    expected = pipeline_scores(app.pipe, str(png))
    for label, score in expected.items():
        assert f'data-label="{label}" data-score="{score!r}"' in table
    assert gallery[0][0].size == (50, 60) and gallery[0][1].startswith("phantom.png · ")

    # A lateral DICOM warns; two DICOM files are one study, as is a zip of them.
    lateral = tmp_path / "lateral.dcm"
    dataset = pydicom.dcmread(DICOM)
    dataset.ViewPosition = "LL"
    dataset.save_as(lateral)
    table, gallery, notes = app.classify([DICOM, str(lateral)], "Cardiomegaly")
    warnings = [line for line in notes.splitlines() if line.startswith("⚠️")]
    assert len(warnings) == 1 and "**lateral.dcm**" in warnings[0] and "lateral view" in warnings[0]
    assert sorted(row.split('"')[1] for row in table.split("<tr data-file=")[1:]) == ["RG1_UNCR.dcm", "lateral.dcm"]
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.write(DICOM, "a/RG1_UNCR.dcm")
        handle.write(lateral, "a/lateral.dcm")
    zipped, _, zipped_notes = app.classify([str(archive)], "Cardiomegaly")
    assert zipped == table and "lateral view" in zipped_notes
    # Without a calibration for the settings: uncalibrated, and said so.
    app.pipe.model.config.calibration = None
    assert "uncalibrated" in app.classify([str(png)], "Nodule")[2]
    with pytest.raises(ValueError, match="upload"):
        app.classify([], "Nodule")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"radz-app exited with {server.returncode}:\n{server.stdout.read()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"radz-app did not answer at {url} within {timeout} s")


def chromium(user_data_dir: Path):
    """Headless Debian Chromium through selenium, with nothing that reaches the network."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"the browser test needs {missing}: run `make browser` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _upload(driver, path, attempts: int = 4, seconds: float = 30):
    """Give the page's file input `path` until the file component lists it. The input can be re-rendered while the
    page finishes loading on a busy machine, which drops a file given too early: so try again."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = Path(path).name
    for _ in range(attempts):
        try:
            driver.find_element(By.CSS_SELECTOR, "#radz-files input[type=file]").send_keys(str(path))
            WebDriverWait(driver, seconds).until(lambda d: name in d.find_element(By.ID, "radz-files").text)
            return
        except (TimeoutException, StaleElementReferenceException):
            continue
    raise AssertionError(f"the page did not take the upload of {name} in {attempts} attempts")


def test_app_in_a_real_browser(checkpoint, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "radz.app", "--model", str(checkpoint), "--port", str(port),
         "--labels", ",".join(LABELS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, server)
        driver = chromium(tmp_path / "chromium-profile")
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(ec.element_to_be_clickable((By.ID, "radz-classify")))
        assert "Not a clinical tool" in driver.find_element(By.TAG_NAME, "body").text
        _upload(driver, DICOM)
        driver.find_element(By.ID, "radz-classify").click()
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#radz-scores tbody tr") or False)
        page = {row.get_attribute("data-label"): float(row.get_attribute("data-score")) for row in rows}
        shown = {row.get_attribute("data-label"): row.text for row in rows}  # "RG1_UNCR.dcm Nodule 0.123"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#radz-overlays img")) >= len(LABELS))
        screenshot = tmp_path / "app_screenshot.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("RADZ_APP_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["RADZ_APP_SCREENSHOT"])
        notes = driver.find_element(By.ID, "radz-notes").text
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
    assert Image.open(screenshot).size[0] >= 1000
    assert "Platt-calibrated" in notes and "RG1_UNCR.dcm" in notes and "PA" in notes
    clf = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    expected = pipeline_scores(clf, DICOM)
    assert set(page) == set(LABELS)
    for label in LABELS:
        assert page[label] == pytest.approx(expected[label], abs=1e-6), label
        assert shown[label].split()[-1] == f"{expected[label]:.3f}", shown[label]
