"""The report in a real browser: headless Chromium loads the page over HTTP from 127.0.0.1
and every figure must load and decode. Also: the report written to S3 (moto server).

How the check works: a local ``http.server`` serves the report directory plus one extra
page, ``/__check__.html``, that loads ``index.html`` in an iframe and, on load, writes
every image's ``src``, ``complete`` and ``naturalWidth`` into the DOM as JSON.
``chromium --headless --dump-dom`` prints that DOM (``--virtual-time-budget`` lets the
page settle first). Two independent witnesses must agree: the browser decoded each image
(naturalWidth > 0) and the server saw each figure requested with status 200. A control
page with a corrupt and a missing image proves the check can fail.

Also here (they need subprocesses or servers): jobs/report.py as a subprocess.
"""

import html
import json
import os
import re
import shutil
import subprocess
import threading
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")

CHECK_PAGE = b"""<!DOCTYPE html><html><body>
<pre id="result">pending</pre>
<iframe id="report" src="index.html" width="1200" height="800"></iframe>
<script>
window.addEventListener("load", function () {
  var doc = document.getElementById("report").contentDocument;
  var imgs = Array.prototype.map.call(doc.images, function (img) {
    return {src: img.getAttribute("src"), complete: img.complete, naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight};
  });
  document.getElementById("result").textContent = JSON.stringify(
    {title: doc.title, sections: doc.querySelectorAll("section").length, images: imgs});
});
</script></body></html>"""


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory, plus the check page, and records (path, status) of each request."""

    def __init__(self, *args, log: list, **kwargs):
        self._log = log
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.path.split("?")[0] == "/__check__.html":
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(CHECK_PAGE)))
            self.end_headers()
            self.wfile.write(CHECK_PAGE)
            return
        super().do_GET()

    def log_request(self, code="-", size="-"):
        self._log.append((self.path.split("?")[0], int(getattr(code, "value", code))))

    def log_message(self, *args):  # keep pytest output clean
        pass


class ReportServer:
    """``http://127.0.0.1:<free port>/`` serving ``directory`` from a daemon thread."""

    def __init__(self, directory: str):
        self.requests: list[tuple[str, int]] = []
        handler = partial(_Handler, directory=directory, log=self.requests)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def check_in_chromium(chromium: str, url: str, profile_dir: str, timeout: float = 90) -> dict:
    """Load ``url`` (the check page) in headless Chromium and return its JSON result."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio",
           f"--user-data-dir={profile_dir}", "--virtual-time-budget=15000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert proc.returncode == 0 and m, (
        f"chromium failed (rc {proc.returncode}); stdout: {proc.stdout[-1500:]!r}; stderr: {proc.stderr[-3000:]}")
    text = html.unescape(m.group(1))
    assert text != "pending", "the check page's load handler never ran"
    return json.loads(text)


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed (Debian: run .ci/install-chromium as root, which does "
                    "`apt-get install -y chromium`); the report's browser check needs it")
    return path


def test_every_report_figure_loads_in_chromium(tmp_path, chromium):
    from rayscreen.report import run_report
    from rayscreen.report.example import write_example_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = write_example_run(str(tmp_path / "out"))
        page = run_report(config, progress=False)
    report_dir = os.path.dirname(page)
    expected = sorted("figures/" + n for n in os.listdir(os.path.join(report_dir, "figures")))
    assert len(expected) >= 10

    with ReportServer(report_dir) as server:
        result = check_in_chromium(chromium, f"{server.url}/__check__.html", str(tmp_path / "profile"))
    assert result["sections"] == 7
    srcs = sorted(img["src"] for img in result["images"])
    assert srcs == expected, "the page must reference every figure written, and nothing else"
    broken = [img for img in result["images"] if not img["complete"] or img["naturalWidth"] == 0]
    assert not broken, f"images that did not load in Chromium: {broken}"
    served = {path for path, code in server.requests if code == 200}
    assert {"/" + s for s in expected} <= served, f"figures the browser did not fetch: {set(expected) - served}"


def test_the_check_catches_broken_images(tmp_path, chromium):
    from rayscreen.report.html import FigureRef, Section, render_page
    from rayscreen.report.figures import Figure, to_png

    site = tmp_path / "site"
    (site / "figures").mkdir(parents=True)
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    (site / "figures" / "good.png").write_bytes(to_png(fig))
    (site / "figures" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    refs = [FigureRef("figures/good.png"), FigureRef("figures/corrupt.png"), FigureRef("figures/missing.png")]
    (site / "index.html").write_text(render_page("control", [Section("Figures", figures=refs)]))
    with ReportServer(str(site)) as server:
        result = check_in_chromium(chromium, f"{server.url}/__check__.html", str(tmp_path / "profile"))
    widths = {img["src"]: img["naturalWidth"] for img in result["images"]}
    assert widths["figures/good.png"] > 0
    assert widths["figures/corrupt.png"] == 0 and widths["figures/missing.png"] == 0
    assert ("/figures/missing.png", 404) in server.requests


def test_report_to_s3_writes_page_and_figures_beside_it(tmp_path, s3_bucket):
    import s3fs

    from rayscreen.report import run_report
    from rayscreen.report.example import write_example_run

    bucket, so = s3_bucket
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = write_example_run(str(tmp_path / "out"), stages=("train", "infer"))
        fs = s3fs.S3FileSystem(endpoint_url=so["endpoint_url"])
        fs.put(local.output + "/", f"{bucket}/run/", recursive=True)
        config = local.replace(output=f"{bucket}/run", storage_options=so)
        uri = run_report(config, progress=False)
    assert uri == f"{bucket}/run/report/index.html"
    fs.invalidate_cache()
    text = fs.cat_file(uri).decode()
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert "figures/plate_P2.png" in srcs and "figures/training_curves.png" in srcs
    for src in srcs:
        assert fs.cat_file(f"{bucket}/run/report/{src}")[:4] == b"\x89PNG"


def test_jobs_report_entry_point(tmp_path):
    """jobs/report.py as ray job submit runs it: a subprocess in the repo, --config."""
    import subprocess
    import sys

    from rayscreen.report.example import write_example_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = write_example_run(str(tmp_path / "out"), stages=("train",))
    cfg = tmp_path / "screen.yaml"
    cfg.write_text(f"plates: {json.dumps(config.plates)}\noutput: {config.output}\nreport:\n  title: My screen\n")
    job = [sys.executable, os.path.join(REPO, "jobs", "report.py"), "--config"]
    proc = subprocess.run([*job, str(cfg), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = os.path.join(config.output, "report", "index.html")
    with open(page) as f:
        text = f.read()
    assert "<title>My screen</title>" in text and "figures/training_curves.png" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"plates: []\noutput: {config.output}\nreport:\n  top_field: 3\n")
    proc = subprocess.run([*job, str(bad), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "report.top_field: unknown key" in proc.stderr, proc.stderr
