"""`dvc plots show` offline: the project's page carries vega inline, `.dvc/config` names it, and the page
draws every declared chart once, with the axis titles dvc.yaml gives, and no script from the network."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visionops import plots_page

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _charts() -> dict[str, dict]:
    """The declared vega charts by the name `dvc plots show` gives them (a stage plot's file, a top-level
    plot's title), with their properties; the image plots (PNG files, evaluate's figures) are not charts."""
    charts = {}
    for stage in DVC["stages"].values():
        for entry in stage.get("plots", []):
            (path, props), = entry.items()
            if "template" in props:
                charts[path] = props
    for entry in DVC["plots"]:
        charts.update(entry)
    return charts


def _dvc(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """`dvc plots show` of the committed reports with the project's page, as plain `dvc plots show` draws it."""
    out = tmp_path_factory.mktemp("plots")
    template = plots_page.write(out / "template.html")
    _dvc("plots", "show", "--html-template", str(template), "-o", str(out / "html"))
    return out / "html" / "index.html"


def test_dvc_config_names_the_page_that_make_setup_writes():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert ROOT / ".dvc" / config["plots"]["html_template"] == ROOT / plots_page.TEMPLATE
    assert "$(PLOTS_PAGE)" in (ROOT / "Makefile").read_text() and str(plots_page.TEMPLATE) in (ROOT / "Makefile").read_text()


def test_the_page_draws_every_chart_once_with_no_script_from_the_network(page):
    html = page.read_text()
    assert not re.search(r"<script[^>]*\ssrc=", html) and "cdn.jsdelivr" not in html  # DVC's own page loads three
    assert "window.vegaEmbed=" in html  # the libraries are inline
    embeds = re.findall(r"vegaEmbed\('#([^']+)'", html)
    assert len(embeds) == len(set(embeds)) == len(_charts()) == 7
    images = sorted(re.findall(r'<img src="static/workspace_([^"]+)"', html))
    figures = sorted(f"reports_evaluate_figures_{p.name}" for p in (ROOT / "reports/evaluate/figures").glob("*.png"))
    assert images == figures  # the figures DVC cannot draw, each once
    assert not [i for i in images if re.search("history|class_distribution|confusion", i)]  # those are charts


def test_every_chart_has_the_axis_titles_dvc_yaml_gives():
    """No axis is titled by a column name DVC made up (a multi-line chart's y axis was titled "y")."""
    shown = json.loads(_dvc("plots", "show", "--json"))["data"]
    charts = _charts()
    assert set(charts) <= set(shown)
    for name, props in charts.items():
        (item,) = shown[name]
        titles = {}

        def walk(o):
            if isinstance(o, dict):
                for k, v in o.items():
                    if k in ("x", "y") and isinstance(v, dict) and "field" in v:
                        titles.setdefault(k, set()).add(v.get("title"))
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)

        walk({k: v for k, v in item["content"].items() if k != "data"})
        assert titles == {"x": {props["x_label"]}, "y": {props["y_label"]}}, name


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium to render the page (apt-get install chromium)")
def test_a_browser_with_no_network_draws_every_chart(page, tmp_path):
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any web request fails
         f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    ).stdout
    assert dom.count('role="graphics-document"') == len(_charts())  # one drawn vega view (SVG) per chart
