"""One look for every figure under docs/: sharp (>= 1,200 px wide), titled with the machine that measured
it, plain tick labels ("600", not "6x10^2"), legends in words. Used by study.py and figures.py."""

from __future__ import annotations

import os
from pathlib import Path

DPI = 150
MIN_WIDTH_PX = 1200
WIDTH_IN = 10.0  # x DPI = 1,500 px


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), with readable default sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10.5, "legend.fontsize": 9, "axes.grid": True,
                         "grid.alpha": 0.3, "figure.dpi": DPI})
    return plt


def figure(ncols: int = 1, nrows: int = 1, width: float = WIDTH_IN, height: float = 4.6, **kw):
    """(fig, axes) of ncols x nrows panels, at least MIN_WIDTH_PX wide when saved."""
    plt = pyplot()
    width = max(width, MIN_WIDTH_PX / DPI)
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), **kw)


def machine(conditions) -> str:
    """The machine a record was measured on, for a title (a record's `conditions`, a dict or an older string)."""
    if isinstance(conditions, dict):
        return conditions.get("machine") or conditions.get("devices") or "unknown machine"
    return str(conditions or "unknown machine")


def title(fig, what: str, conditions=None, verb: str = "measured") -> None:
    """The figure's title: what it shows, then where (and when) it was measured (or `verb`: compiled...)."""
    where = ""
    if conditions is not None:
        where = f"\n{verb} on {machine(conditions)}"
        if isinstance(conditions, dict) and conditions.get("jax"):
            where += f", jax {conditions['jax']}"
        if isinstance(conditions, dict) and conditions.get("date"):
            where += f", {str(conditions['date'])[:10]}"
        if isinstance(conditions, dict) and isinstance(conditions.get("load"), list):  # a shared machine's load
            where += f", load average {conditions['load'][0]:g} (other processes running)"
    fig.suptitle(what + where, fontsize=11.5)


def plain(value: float, _pos=None) -> str:
    """A tick label in plain digits: 1,024 / 0.5 / 0.01 (never 1e+03 or 10^3)."""
    if value == 0:
        return "0"
    if abs(value) >= 1:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{value:.3g}"


def log_axis(ax, which: str = "y", ticks=None) -> None:
    """Log scale on `which` ("x", "y" or "xy") with plain tick labels; `ticks` fixes the major ticks."""
    from matplotlib import ticker

    for w in which:
        axis = ax.xaxis if w == "x" else ax.yaxis
        (ax.set_xscale if w == "x" else ax.set_yscale)("log")
        if ticks is not None:
            axis.set_major_locator(ticker.FixedLocator(list(ticks)))
        else:
            axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(plain))
        axis.set_minor_formatter(ticker.NullFormatter())


def save(fig, path: str | os.PathLike) -> Path:
    """Save at DPI; fails if the PNG would be narrower than MIN_WIDTH_PX (docs' figures are read on screens)."""
    plt = pyplot()
    width_px = fig.get_figwidth() * DPI
    if width_px < MIN_WIDTH_PX:
        plt.close(fig)
        raise ValueError(f"{path}: {width_px:.0f} px wide; make the figure at least {MIN_WIDTH_PX / DPI:.1f} in wide")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR header (no imaging library needed)."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
