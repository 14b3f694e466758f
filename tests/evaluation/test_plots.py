"""Reliability diagrams: empty bins draw nothing, the share of voxels per bin is drawn beneath,
and drawing leaves matplotlib's global state (the backend) alone."""
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from nnunet_calibration.evaluation.plots import plot_reliability_diagram, reliability_figure

EDGES = np.linspace(0, 1, 6)  # 5 bins
N = np.array([10, 0, 0, 30, 60])  # bins 2 and 3 are empty
CONF = np.array([0.1, np.nan, np.nan, 0.7, 0.9])
FREQ = np.array([0.2, np.nan, np.nan, 0.5, 0.95])


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_empty_bins_draw_no_bar():
    fig = reliability_figure(EDGES, N, CONF, FREQ, title="t")
    ax, ax_share = fig.axes
    bars = _bars(ax)
    # per non-empty bin: the observed-frequency bar and the gap bar; nothing else
    assert len(bars) == 2 * 3
    lefts = sorted({round(b.get_x(), 6) for b in bars})
    assert lefts == [0.0, 0.6, 0.8]  # bins 0, 3, 4; nothing at 0.2 or 0.4
    for b in bars:
        assert np.isfinite(b.get_height()) and np.isfinite(b.get_y())
    freq_bars = [b for b in bars if b.get_y() == 0]
    assert sorted(round(b.get_height(), 6) for b in freq_bars) == [0.2, 0.5, 0.95]
    gap = {round(b.get_x(), 6): (b.get_y(), b.get_y() + b.get_height()) for b in bars if b.get_y() != 0}
    assert gap[0.6] == pytest.approx((0.5, 0.7)) and gap[0.0] == pytest.approx((0.2, 0.1))


def test_share_of_voxels_beneath():
    fig = reliability_figure(EDGES, N, CONF, FREQ)
    _, ax_share = fig.axes
    bars = _bars(ax_share)
    assert len(bars) == 3
    shares = {round(b.get_x(), 6): b.get_height() for b in bars}
    assert shares == {0.0: pytest.approx(0.1), 0.6: pytest.approx(0.3), 0.8: pytest.approx(0.6)}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_all_empty_draws_no_bar(tmp_path):
    fig = reliability_figure(EDGES, np.zeros(5), np.full(5, np.nan), np.full(5, np.nan))
    assert all(len(_bars(ax)) == 0 for ax in fig.axes)
    plot_reliability_diagram(tmp_path / "r.png", EDGES, N, CONF, FREQ)
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_importing_and_plotting_keeps_the_backend():
    """No ``matplotlib.use`` in the library: a program's backend survives plotting (fresh interpreter)."""
    code = ("import matplotlib; matplotlib.use('svg'); import numpy as np;"
            "from nnunet_calibration.evaluation import plots;"
            "import nnunet_calibration.experiments.report;"
            "plots.reliability_figure(np.linspace(0, 1, 3), np.array([1, 1]), np.array([.2, .8]), np.array([0., 1.]));"
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
