"""`saeforge browse` on the tiny training run, looked at in a real headless Chromium (the system's
chromium + chromium-driver, which .ci/run installs): the latent table renders, sorts, filters and
links to a latent page that shows highlighted contexts. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from saeforge.cli import main

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Flags that run Chromium headless in a container without a GPU, a sandbox or a network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def chromium(profile: Path):
    """A real headless Chromium driven through selenium (a fresh profile each time)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require(CHROMIUM.exists() and CHROMEDRIVER.exists(), "the system packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    """One `saeforge browse --json` of the tiny run's registered SAE: (site folder, summary)."""
    out = tmp_path_factory.mktemp("browse") / "site"
    uri = f"models:/{tiny_run['registered_model']}/{tiny_run['version']}"
    argv = ["browse", uri, "--tokens", "3000", "--n-latents", "12", "--top-k", "5", "--out", str(out), "--json"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, json.loads(printed.getvalue())


def test_browse_writes_a_site_and_logs_it_to_the_run(tiny_run, site):
    from mlflow.tracking import MlflowClient

    out, summary = site
    assert summary["index"] == str(out.resolve() / "index.html") and summary["logged"] is True
    assert summary["pages"] == 12 and summary["tokens"] > 2000
    pages = sorted(int(p.stem) for p in (out / "latents").glob("*.html"))
    assert pages == sorted(summary["page_latents"])
    logged = {a.path for a in MlflowClient().list_artifacts(tiny_run["run_id"], "browser")}
    assert "browser/index.html" in logged and "browser/latents" in logged
    for page in [out / "index.html", *(out / "latents").glob("*.html")]:
        text = page.read_text()
        # self-contained: nothing loaded from anywhere (the SVG namespace is a name, not a fetch)
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text) and "<link" not in text


def test_the_site_in_a_real_browser(site, tmp_path):
    from selenium.webdriver.common.by import By

    out, _ = site
    driver = chromium(tmp_path / "profile")
    try:
        driver.get((out / "index.html").resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
        assert len(rows) == 128  # every latent of the tiny SAE
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg rect")) > 10  # the charts drew
        driver.save_screenshot(str(tmp_path / "overview.png"))

        def column(i: int) -> list[float]:
            cells = driver.find_elements(By.CSS_SELECTOR, f"#latents tbody tr td:nth-child({i})")
            return [float(c.get_attribute("data-v")) for c in cells]

        header = driver.find_elements(By.CSS_SELECTOR, "#latents thead th")[1]  # frequency
        header.click()
        assert header.get_attribute("aria-sort") == "descending"
        freq = column(2)
        assert freq == sorted(freq, reverse=True) and freq[0] > freq[-1]
        header.click()
        assert header.get_attribute("aria-sort") == "ascending" and column(2) == sorted(freq)

        search = driver.find_element(By.ID, "search")
        search.send_keys("12")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr") if r.is_displayed()]
        assert 0 < len(visible) < 128 and int(driver.find_element(By.ID, "shown").text) == len(visible)
        assert all("12" in r.get_attribute("data-search") for r in visible)
        search.clear()
        search.send_keys(" ")  # back to every row

        header.click()  # most frequent first: those have pages
        link = driver.find_element(By.CSS_SELECTOR, "#latents tbody tr td a")
        latent = link.text
        link.click()
        assert driver.current_url.endswith(f"/latents/{latent}.html")
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Latent {latent}"
        examples = driver.find_elements(By.CSS_SELECTOR, "#top .example")
        assert 1 <= len(examples) <= 5
        shaded = driver.find_elements(By.CSS_SELECTOR, "#top .t[style*='background']")
        assert len(shaded) >= len(examples)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#top .t.peak")) == len(examples)
        assert driver.find_elements(By.CSS_SELECTOR, "#quantiles .example")
        driver.save_screenshot(str(tmp_path / "latent.png"))
        back = driver.find_element(By.LINK_TEXT, "\u2190 overview")
        back.click()
        assert driver.current_url.endswith("/index.html")
    finally:
        driver.quit()
    for shot in ("overview.png", "latent.png"):
        assert (tmp_path / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def narrow_sae(folder: Path) -> str:
    """A saved SAE that reads 32-wide activations of the tiny model, whose hidden size is 64."""
    import variants
    from saeforge.core.sae_files import SaeMeta, save_sae

    sae = variants.build("relu", d_in=32, d_sae=64)
    save_sae(sae, folder, SaeMeta("tiny", "blocks.3.hook_resid_post", 3, 128, "wiki"))
    return str(folder)


@pytest.mark.parametrize(
    "args, message",
    [
        (["./no/such/sae"], "cannot read './no/such/sae'"),
        (["models:/no-such-model/1"], "cannot read 'models:/no-such-model/1'"),
        (["TINY", "--latents", "5,999"], "latent 999 is out of range: the SAE has 128 latents"),
        (["TINY", "--latents", "-1"], "latent -1 is out of range"),
        (["TINY", "--n-latents", "0"], "--n-latents must be at least 1"),
        (["TINY", "--latents", "most"], "--latents: expected frequent, random, all or comma-separated"),
        (["TINY", "--tokens", "0"], "--tokens must be at least 1"),
        (["NARROW"], "the SAE reads activations of width 32, but model 'tiny' has width 64"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, args, message, capsys):
    folders = {"TINY": str(Path(tiny_run["checkpoint"]) / "sae"), "NARROW": "NARROW"}
    argv = [folders.get(a, a) for a in args]
    if "NARROW" in argv:
        argv[argv.index("NARROW")] = narrow_sae(tmp_path / "narrow")
    assert main(["browse", *argv, "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saeforge: error: ") and message in err[0]
    assert not (tmp_path / "site").exists()


def test_bad_input_from_the_command_line_exits_before_ray(tmp_path):
    folder = narrow_sae(tmp_path / "narrow")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # had it tried to reach Ray, this would hang or fail
    result = subprocess.run(
        [sys.executable, "-m", "saeforge.cli", "browse", folder],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "saeforge: error: the SAE reads activations of width 32, but model 'tiny' has width 64: "
        "pass the --model it was trained on"
    ]
