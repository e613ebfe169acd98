"""Figures: pure functions from plain numbers to PNG files, for `duda report` and the benchmarks.

Every function takes lists, dicts or arrays of numbers and a path, draws one figure with
matplotlib's Agg renderer on a `Figure` of its own (no pyplot, so no global figure state and no
display) and writes it as a PNG without a timestamp or version stamp. matplotlib is an
optional dependency (`pip install -e '.[report]'`), imported inside the functions only;
`require_matplotlib()` lets a caller check for it before doing any work. Values that are None
or NaN are gaps: a broken line, a missing bar, a grey cell.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.runtime.errors import DudaError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install -e '.[report]'"

Points = Sequence[tuple[float, float | None]]  # (iteration, value) pairs

DPI = 100
MARKER_POINTS = 20  # a curve of this many points or fewer is drawn with markers (evaluations)
_RC_SETTINGS = {"font.size": 8, "axes.titlesize": 9, "axes.grid": True, "grid.alpha": 0.3,
          "legend.fontsize": 8, "figure.titlesize": 11}


def require_matplotlib() -> None:
    """Raise a `DudaError` with the install command when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DudaError("drawing figures needs matplotlib, which is not installed",
                        INSTALL_HINT) from None


def curves_figure(series: Mapping[str, Points], path: str | Path, *, title: str = "",
                  ylabel: str = "", xlabel: str = "iteration",
                  std: Mapping[str, Sequence[float | None]] | None = None,
                  logy: bool = False) -> Path:
    """Several named curves over iterations in one plot, one legend entry each.

    `std[name]`, one value per point of `series[name]`, shades a mean ± std band around it
    (e.g. the spread over seeds).
    """
    with _drawing():
        figure = _figure(7.0, 4.0)
        axes = figure.add_subplot()
        colours = _colours(series)
        _draw_curves(axes, series, colours, std or {})
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if logy:
            axes.set_yscale("log")
        if len(series) > 1:
            axes.legend(loc="best")
        return _save(figure, path)


def small_multiples(panels: Mapping[str, Mapping[str, Points]], path: str | Path, *,
                    title: str = "", xlabel: str = "iteration", columns: int = 3) -> Path:
    """One small plot per panel (titled by its key), one line per named curve in each.

    A curve name keeps its colour in every panel and appears once in a shared legend, so
    `panels = {"loss/source_ce": {"run A": [...], "run B": [...]}, …}` overlays runs key by key.
    """
    if not panels:
        raise ValueError("small_multiples needs at least one panel")
    with _drawing():
        columns = max(1, min(columns, len(panels)))
        rows = math.ceil(len(panels) / columns)
        figure = _figure(3.6 * columns + 0.4, 2.5 * rows + 0.9)
        colours = _colours(*panels.values())
        grid = figure.subplots(rows, columns, squeeze=False)
        for axes, (name, series) in zip(grid.flat, panels.items()):
            _draw_curves(axes, series, colours, {})
            axes.set_title(name)
            axes.set_xlabel(xlabel)
        for axes in grid.flat[len(panels):]:
            axes.set_visible(False)
        if title:
            figure.suptitle(title)
        if len(colours) > 1:
            handles = [_legend_line(colour, name) for name, colour in colours.items()]
            figure.legend(handles=handles, loc="outside lower center",
                          ncols=min(len(handles), 4))
        return _save(figure, path)


def bars_figure(groups: Mapping[str, Mapping[str, float | None]], path: str | Path, *,
                title: str = "", ylabel: str = "", ylim: tuple[float, float] | None = None,
                ) -> Path:
    """Bars per category (x axis), one bar per group side by side; a single group's bars carry
    their value. Categories are taken in order of first appearance over the groups."""
    categories = list(dict.fromkeys(c for values in groups.values() for c in values))
    if not categories:
        raise ValueError("bars_figure needs at least one value")
    with _drawing():
        figure = _figure(max(6.0, 0.45 * len(categories) * max(1, len(groups)) ** 0.5 + 1.5),
                         4.0)
        axes = figure.add_subplot()
        colours = _colours({name: () for name in groups})
        width = 0.8 / max(1, len(groups))
        x = np.arange(len(categories))
        for g, (name, values) in enumerate(groups.items()):
            heights = np.array([_number(values.get(c)) for c in categories])
            offset = (g - (len(groups) - 1) / 2) * width
            drawn = axes.bar(x + offset, np.nan_to_num(heights), width,
                             color=colours[name], label=name)
            for bar, height in zip(drawn, heights):
                if math.isnan(height):
                    bar.set_visible(False)
            if len(groups) == 1:
                axes.bar_label(drawn, labels=["" if math.isnan(h) else f"{h:.1f}"
                                              for h in heights], fontsize=7, padding=1)
        axes.set_xticks(x, categories, rotation=45, ha="right", rotation_mode="anchor")
        axes.grid(axis="x", visible=False)
        axes.set(title=title, ylabel=ylabel)
        if ylim is not None:
            axes.set_ylim(*ylim)
        if len(groups) > 1:
            axes.legend(loc="best")
        return _save(figure, path)


def heatmap_figure(matrix: Any, path: str | Path, *, row_labels: Sequence[str],
                   column_labels: Sequence[str], title: str = "", xlabel: str = "",
                   ylabel: str = "", vmin: float | None = None, vmax: float | None = None,
                   colorbar_label: str = "", annotate: bool = True, percent: bool = False,
                   ) -> Path:
    """A labelled matrix as a heat map (e.g. a row-normalised confusion matrix), NaN cells grey.

    `annotate` writes each cell's value (×100 with `percent`), cells that round to 0 left blank.
    """
    values = _matrix(matrix)
    if values.shape != (len(row_labels), len(column_labels)):
        raise ValueError(f"matrix {values.shape} does not match {len(row_labels)} row and "
                         f"{len(column_labels)} column labels")
    with _drawing():
        size = 0.32 * max(values.shape) + 2.5
        figure = _figure(size + 1.0, size)
        axes = figure.add_subplot()
        image = axes.imshow(np.ma.masked_invalid(values), cmap=_colormap(), vmin=vmin,
                            vmax=vmax, aspect="auto", interpolation="nearest")
        axes.set_xticks(range(len(column_labels)), column_labels, rotation=45, ha="right",
                        rotation_mode="anchor")
        axes.set_yticks(range(len(row_labels)), row_labels)
        axes.grid(False)
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        figure.colorbar(image, ax=axes, label=colorbar_label, shrink=0.8)
        if annotate:
            scale = 100 if percent else 1
            middle = ((vmin if vmin is not None else np.nanmin(values, initial=0))
                      + (vmax if vmax is not None else np.nanmax(values, initial=1))) / 2
            for (row, column), value in np.ndenumerate(values):
                text = "" if math.isnan(value) else f"{scale * value:.0f}"
                if text and text not in ("0", "-0"):
                    axes.text(column, row, text, ha="center", va="center", fontsize=6,
                              color="white" if value < middle else "black")
        return _save(figure, path)


def timeline_heatmaps(panels: Mapping[str, tuple[Sequence[float], Any]], path: str | Path, *,
                      row_labels: Sequence[str], title: str = "", xlabel: str = "iteration",
                      vmin: float | None = None, vmax: float | None = None,
                      colorbar_label: str = "") -> Path:
    """Per-class values over iterations as heat maps, one per panel (e.g. one per run) with a
    shared colour scale: `panels[name] = (iterations (T,), values (T, C))`; rows are the C
    classes, columns the logged iterations at their true positions, NaN grey."""
    if not panels:
        raise ValueError("timeline_heatmaps needs at least one panel")
    with _drawing():
        figure = _figure(9.0, (0.16 * len(row_labels) + 0.9) * len(panels) + 0.8)
        grid = figure.subplots(len(panels), 1, squeeze=False, sharex=True)
        image = None
        for axes, (name, (iterations, values)) in zip(grid.flat, panels.items()):
            x = np.asarray(iterations, dtype=float)
            matrix = _matrix(values)
            if matrix.shape != (len(x), len(row_labels)):
                raise ValueError(f"panel {name!r}: values {matrix.shape} do not match "
                                 f"{len(x)} iterations and {len(row_labels)} classes")
            image = axes.pcolormesh(_edges(x), np.arange(len(row_labels) + 1) - 0.5,
                                    np.ma.masked_invalid(matrix.T), cmap=_colormap(),
                                    vmin=vmin, vmax=vmax, shading="flat")
            axes.set_yticks(range(len(row_labels)), row_labels, fontsize=6)
            axes.invert_yaxis()
            axes.grid(False)
            axes.set_title(name)
            axes.set_xlabel(xlabel)
        if title:
            figure.suptitle(title)
        figure.colorbar(image, ax=list(grid.flat), label=colorbar_label, shrink=0.9)
        return _save(figure, path)


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _drawing() -> Iterator[None]:
    require_matplotlib()
    import matplotlib

    with matplotlib.rc_context(_RC_SETTINGS):
        yield


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" entry: the bytes depend on the numbers, not on the matplotlib version.
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def _colours(*series: Mapping[str, Any]) -> dict[str, Any]:
    """One colour per curve name, in order of first appearance."""
    from matplotlib import colormaps

    names = list(dict.fromkeys(name for group in series for name in group))
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(names)}


def _draw_curves(axes: Axes, series: Mapping[str, Points], colours: Mapping[str, Any],
                 std: Mapping[str, Sequence[float | None]]) -> None:
    for name, points in series.items():
        if not points:
            continue
        x = np.array([p[0] for p in points], dtype=float)
        y = np.array([_number(p[1]) for p in points])
        marker = "o" if len(points) <= MARKER_POINTS else None
        axes.plot(x, y, color=colours[name], label=name, marker=marker, markersize=3,
                  linewidth=1.2)
        if name in std:
            spread = np.array([_number(s) for s in std[name]])
            axes.fill_between(x, y - spread, y + spread, color=colours[name], alpha=0.2,
                              linewidth=0)


def _legend_line(colour: Any, name: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, label=name, linewidth=1.5)


def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _matrix(values: Any) -> np.ndarray:
    rows = [[_number(v) for v in row] for row in values]
    return np.array(rows, dtype=float).reshape(len(rows), -1)


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted positions `x` (T,) -> (T + 1,): halfway between neighbours."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    middle = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (middle[0] - x[0])], middle, [x[-1] + (x[-1] - middle[-1])]])
