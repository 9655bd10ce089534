"""Both reports of a real run, rendered by headless Chromium: every plot loads and is drawn.

A small DP + secure-aggregation simulation writes the training and privacy reports as the main job
does; Chromium (Debian's, installed by scripts/setup.sh) loads each page, a script in the page
draws every ``<img>`` onto a canvas and counts its coloured pixels, and a screenshot of the page is
checked for colour too (the plots' lines: the rest of each page is black on white).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from pathlib import Path
from subprocess import run

import matplotlib.image as mpimg
import numpy as np
import pytest

from fedhealth.cli import main

pytestmark = pytest.mark.slow

PROBE = """<script>
window.addEventListener("load", () => {
  const found = [...document.images].map((img) => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const g = canvas.getContext("2d");
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, canvas.width || 1, canvas.height || 1).data;
    let coloured = 0;
    for (let i = 0; i < d.length; i += 4) {
      const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
      if (hi - lo > 80) coloured++;
    }
    return {id: img.id, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight, shown: img.getBoundingClientRect().width,
            coloured: coloured / Math.max(1, d.length / 4)};
  });
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify(found);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    """Chromium, or skip only where it is absent and setup.sh could not have installed it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("chromium is not installed, but could be: run scripts/setup.sh")
    pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")


def _headless(chromium: str, *args: str) -> str:
    done = run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def _render(chromium: str, page: Path, work: Path) -> tuple[list[dict], np.ndarray]:
    """Load ``page`` in Chromium: what the in-page probe found per image, and a screenshot."""
    probed = work / page.name  # a copy with the probe; the report itself stays as written
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _headless(chromium, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    assert found, f"the page never finished loading: {dom[-500:]}"
    shot = work / f"{page.stem}.png"
    _headless(chromium, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    return json.loads(html.unescape(found.group(1))), mpimg.imread(shot)


def test_both_reports_of_a_real_run_render_with_their_plots_drawn(cohort, tmp_path, capsys):
    chromium = _chromium()
    overrides = [
        "sites=3",
        "rounds=2",
        "data.train_per_site=6",
        "data.test_per_site=3",
        "train.local_epochs=1",
        f"data.root={cohort}",
        f"run_root={tmp_path / 'runs'}",
        f"privacy.ledger_root={tmp_path / 'ledgers'}",
        "run_name=render",
    ]
    assert main(["simulate", *overrides]) == 0
    run_dir = tmp_path / "runs" / "render"
    work = tmp_path / "rendered"
    work.mkdir()
    expected = {"training-report.html": 2, "privacy-report.html": 1}
    for name, least in expected.items():
        images, screenshot = _render(chromium, run_dir / name, work)
        assert len(images) >= least, (name, images)
        for image in images:
            assert image["complete"] and image["width"] > 300 and image["height"] > 200, image
            assert image["shown"] > 300, image  # laid out at a readable size
            assert image["coloured"] > 0.001, image  # lines drawn, not a blank canvas
        rgb = screenshot[..., :3]
        assert (np.ptp(rgb, axis=2) > 0.3).mean() > 0.0005, name  # plots visible on the page
    print(f"screenshots: {sorted(p.name for p in work.glob('*.png'))} in {work}")
