"""The page `dvc plots show` fills, with vega inline: DVC's own page loads vega, vega-lite and vega-embed
from a CDN, so offline its charts are blank. This one carries vl-convert-python's bundle of the three (no
`{scripts}` placeholder, so DVC adds no CDN tags), and `.dvc/config` names it (plots.html_template), so
`dvc plots show` draws every chart with no network.

    python -m visionops.plots_page     # writes TEMPLATE (`make setup` and `make plots` do)
"""

from __future__ import annotations

import sys
from pathlib import Path

from visionops import atomic
from visionops.errors import VisionopsError

TEMPLATE = Path(".dvc/plots/offline.html")  # relative to the project root; .dvc/config: plots/offline.html
VEGA_LITE = "5.21"  # the newest vega-lite 5: DVC 3 writes vega-lite 5 specs
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what DVC replaces in the page

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
<script type="text/javascript">
(function () {{
{bundle}
}})();
</script>
<style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def render() -> str:
    """The page: vega, vega-lite and vega-embed as globals (inside a function, so the bundle's own top-level
    names cannot clash with the `var spec` of DVC's chart scripts), then DVC's charts."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    clashes = [p for p in PLACEHOLDERS if p in bundle]
    if clashes:
        raise VisionopsError(f"vl-convert's javascript bundle contains DVC's placeholders {clashes}")
    return PAGE.format(bundle=bundle)


def write(path: Path = TEMPLATE) -> Path:
    atomic.write_text(path, render())
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else TEMPLATE))
