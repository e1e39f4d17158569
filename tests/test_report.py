"""``report.html``: self-contained (the figures embedded as base64) and every figure shown at its own, readable size."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np

from skinfusion.workflows.report import write_curves, write_html

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-0.1.0" / "ensemble-mean"


def _metrics() -> dict:
    val = json.loads((FIXTURE / "manifest.json").read_text())["validation_metrics"]
    return {"run": "RUN", "scope": "test split", "n_images": 12, "n_skipped": 0, "method": "mean",
            "members": {v: val[v] for v in ("rgb", "hsv", "fft")}, "fused": val["fused"]}


def test_the_report_embeds_every_figure_at_its_own_width(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    names = write_curves(y, {"fused": np.clip(y * 0.4 + rng.random(20) * 0.6, 0, 1)}, tmp_path)
    wide = np.full((484, 1100, 3), 255, np.uint8)  # as wide as the risk-coverage figure (10 in at 110 dpi)
    cv2.line(wide, (0, 0), (1099, 483), (0, 0, 0), 2)
    cv2.imwrite(str(tmp_path / "risk_coverage.png"), wide)
    page = write_html(_metrics(), tmp_path, [*names, "risk_coverage.png"]).read_text()
    sources = re.findall(r'<img src="([^"]+)"[^>]*style="width:(\d+)px', page)
    assert len(sources) == len(names) + 1
    for (src, width), name in zip(sources, [*names, "risk_coverage.png"]):
        assert src.startswith("data:image/png;base64,"), src[:40]  # nothing to fetch: the page stands alone
        data = base64.b64decode(src.split(",", 1)[1])
        assert data == (tmp_path / name).read_bytes()
        shown = int(width)
        assert shown == cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[1] and shown > 360
        assert f'href="{name}"' in page  # and still links to the file
    assert 'style="width:1100px;max-width:100%"' in page
