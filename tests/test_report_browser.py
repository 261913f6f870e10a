"""The audit report in a real browser (headless Chromium driven by selenium): after curate runs over
image files, parquet and WebDataset shards, every thumbnail of report/index.html loads from the
run directory (file:// and a static HTTP server) and inside MLflow's UI, which shows an HTML
artifact in a sandboxed iframe loaded from a blob: URL (there the page carries data: URIs)."""

import functools
import http.server
import io
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import workflow
from images import write_rgb_images
from mlflow_server import http_server, mlflow_server

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium and chromedriver on PATH: install them "
                       "(Debian: apt-get install chromium chromium-driver, as .ci/setup does) to run the browser test"),
    pytest.mark.usefixtures("ray_local"),
]
# quantile: some items flagged and some kept whatever the random tiny model scores, so all sheets fill
MCM_QUANTILE = "detectors.0.threshold={strategy: quantile, value: 0.4, sample_size: 64, min_sample: 2}"
LOADED_IMAGES = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _sources(tmp_path: Path) -> dict[str, Path]:
    """Eight decodable images plus one broken item in each input format."""
    paths = write_rgb_images(tmp_path / "images", 8)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    data = [Path(p).read_bytes() for p in paths]
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"id": [f"row{i}" for i in range(9)], "image": data + [b"garbage"]}),
                   tmp_path / "parquet" / "part-0.parquet")
    (tmp_path / "webdataset").mkdir()
    with tarfile.open(tmp_path / "webdataset" / "shard-0.tar", "w") as tar:
        for i, payload in enumerate(data + [b"broken"]):
            info = tarfile.TarInfo(f"sample{i:02d}.{'jpg' if i % 2 == 0 else 'png'}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {fmt: tmp_path / fmt for fmt in ("images", "parquet", "webdataset")}


def _loaded_images(driver) -> list[list]:
    """[complete, naturalWidth] of every <img> once all have finished loading (or failing)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: all(done for done, _ in d.execute_script(LOADED_IMAGES)))
    return driver.execute_script(LOADED_IMAGES)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _static_server(root: Path):
    return http_server(functools.partial(_QuietHandler, directory=str(root)))


def _mlflow_report(driver, url: str, run_id: str) -> list[list]:
    """Open the run's artifact view of report/index.html in MLflow's UI; the images inside its iframe."""
    import mlflow
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    experiment = mlflow.MlflowClient(url).get_run(run_id).info.experiment_id
    driver.get(f"{url}/#/experiments/{experiment}/runs/{run_id}/artifactPath/report/index.html")
    frame = WebDriverWait(driver, 90).until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "iframe.mlflow-html-iframe")))
    assert frame.get_attribute("src").startswith("blob:") and frame.get_attribute("sandbox") == "allow-scripts"
    driver.switch_to.frame(frame)
    try:
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Curation report")
        return _loaded_images(driver)
    finally:
        driver.switch_to.default_content()


def test_thumbnails_load_from_the_run_directory_and_in_mlflow(make_config, tmp_path, browser):
    with mlflow_server(tmp_path / "mlflow") as url:
        runs = {}
        for fmt, source in _sources(tmp_path).items():
            cfg = make_config(str(source), f"source.format={fmt}", f"run_name={fmt}", f"tracking.uri={url}",
                              MCM_QUANTILE, detectors=("mcm",))
            summary = workflow.curate(cfg)
            assert summary["report"]["status"] == "ok" and summary["tracking"]["status"] == "ok"
            assert summary["this_run"]["failed"] == 1 and summary["this_run"]["removed"] >= 1
            runs[fmt] = summary["mlflow_run_id"]

        for fmt in runs:
            page = tmp_path / "out" / fmt / "report" / "index.html"
            expected = page.read_text().count("<img ")
            browser.get(page.as_uri())
            images = _loaded_images(browser)
            print(f"{fmt}: {len(images)} thumbnails loaded from {page.as_uri()}")
            assert len(images) == expected >= 8 and all(width > 0 for _, width in images), (fmt, images)
        with _static_server(tmp_path / "out") as host:
            base = f"http://{host}"
            browser.get(f"{base}/parquet/report/index.html")
            images = _loaded_images(browser)
            assert len(images) >= 8 and all(width > 0 for _, width in images), images

        for fmt, run_id in runs.items():
            expected = (tmp_path / "out" / fmt / "report" / "index.html").read_text().count("<img ")
            images = _mlflow_report(browser, url, run_id)
            print(f"{fmt}: {len(images)} thumbnails loaded in MLflow's artifact view")
            assert len(images) == expected and all(width > 0 for _, width in images), (fmt, images)
