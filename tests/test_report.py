"""The HTML report is one self-contained file: escaped text, tables, embedded PNGs."""

import numpy as np
import pytest

from dynconv.report import Report, array_png, figure_png

pytest.importorskip("matplotlib")


def test_report_is_self_contained(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    report = Report("demo <x2>")
    report.heading("Results").table([{"model": "plain", "psnr": 31.234567, "flops": 1.5e6}])
    report.image(figure_png(fig), "loss").images([(array_png(np.zeros((4, 4, 3))), "a"), (array_png(np.ones((4, 4, 3))), "b")])
    path = report.write(tmp_path / "r" / "report.html")
    text = path.read_text()
    assert "demo &lt;x2&gt;" in text and "<td>31.23</td>" in text and "<td>1.5e+06</td>" in text
    assert text.count("data:image/png;base64,") == 3
    assert "src=\"http" not in text and "<link" not in text
