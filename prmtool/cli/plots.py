"""PNG plots of a shard set, for `prmtool stats --plot`: one function per plot, data in, file out.

matplotlib is imported inside `_figure`, not at module level: `prmtool --help` and every other
stage import this package and should not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

BINS = 20  # over [0, 1]: every plotted value here is a share


def mc_values(values: Sequence[float], path: Path) -> None:
    """Histogram of per-step Monte Carlo values (the share of rollouts from a prefix that end right)."""
    figure, axes = _figure()
    axes.hist(values, bins=BINS, range=(0, 1), edgecolor="white")
    axes.set(
        title=f"Per-step MC values ({len(values):,} steps)", xlabel="MC value of the step's prefix", ylabel="steps"
    )
    _save(figure, path)


def first_error_position(positions: Sequence[float], path: Path) -> None:
    """Histogram of first_error / number of steps, for the responses that have a first error."""
    figure, axes = _figure()
    axes.hist(positions, bins=BINS, range=(0, 1), edgecolor="white")
    axes.set(
        title=f"First error position ({len(positions):,} responses)",
        xlabel="first error / steps in the response (0 = first step)",
        ylabel="responses",
    )
    _save(figure, path)


def accuracy_per_problem(accuracies: Sequence[float], path: Path) -> None:
    """Histogram of each problem's share of correct responses."""
    figure, axes = _figure()
    axes.hist(accuracies, bins=BINS, range=(0, 1), edgecolor="white")
    axes.set(
        title=f"Accuracy per problem ({len(accuracies):,} problems)",
        xlabel="share of correct responses",
        ylabel="problems",
    )
    _save(figure, path)


def filter_reasons(counts: dict[str, int], path: Path) -> None:
    """Horizontal bars: rows per filter outcome, "kept" plus one bar per filter_reason, in the
    order given (top to bottom)."""
    labels, values = list(counts), list(counts.values())
    figure, axes = _figure(height=max(2.5, 1.2 + 0.4 * len(labels)), counts_on="x")  # room for every reason's label
    colors = ["tab:green" if label == "kept" else "tab:red" for label in labels]
    bars = axes.barh(labels, values, color=colors)
    axes.bar_label(bars, labels=[f"{value:,}" for value in values], padding=3)
    axes.invert_yaxis()  # first label on top
    axes.margins(x=0.15)  # room for the count after the longest bar
    axes.set(title=f"Kept and removed rows ({sum(values):,} rows)", xlabel="rows")
    _save(figure, path)


def _figure(height: float = 4.0, counts_on: str = "y"):
    """A figure with one axes whose `counts_on` axis ("x" or "y") has whole-number ticks only."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no figure
    # registry to leak when stats runs in-process (tests, notebooks).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.0, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    getattr(axes, f"{counts_on}axis").set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _save(figure, path: Path) -> None:
    """Write the PNG through a new hidden file renamed into place, so `path` is always a whole
    file, and never a link or a device replaced (prmtool.core.outputs.replace_atomically)."""
    from prmtool.core.outputs import replace_atomically

    replace_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=100), "--plot")
