"""Training diagnostics as one PNG, read back from a run's TensorBoard events.

The trainer logs every step's per-objective losses, cos(g_task, g_k), the norm ratios
||g_k|| / ||g_task|| and the aggregation weights (docs/method.md, "The problem"). `plot_diagnostics`
draws them in four panels so that a run can be judged without a TensorBoard server: whether
the objectives conflict (cos < 0), whether one gradient dominates (ratio far from 1) and how
the aggregator responds (weights). Tags are matched by prefix, so the panels follow however
many objectives the run had (K = 2: task, distill; K = 3: task, logit, feature).
"""

import io

import numpy as np
from etils import epath
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mokd_jax.events import Series, read_scalars

SMOOTHING_FRACTION = 0.02
"""The moving-average window as a fraction of the steps: wide enough to read a trend
through per-batch noise, narrow enough to keep the first steps' transient visible."""


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values; the first ones average what exists.

    Same length as `values` and no zero padding, so the start of the curve is not dragged
    towards zero as a centred `np.convolve` would drag it.
    """
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def smoothing_window(num_points: int) -> int:
    return max(1, round(SMOOTHING_FRACTION * num_points))


def draw_series(ax: Axes, scalars: dict[str, Series], prefix: str) -> None:
    """Each tag starting with `prefix`: raw values faint, their moving average on top."""
    tags = sorted(tag for tag in scalars if tag.startswith(prefix))
    for tag in tags:
        steps, values = scalars[tag]
        (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
        smooth = moving_average(values, smoothing_window(len(values)))
        ax.plot(steps, smooth, color=raw.get_color(), linewidth=1.5, label=tag)
    if tags:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no {prefix}* tags logged", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_diagnostics(
    events_dir: str, png_path: str, title: str = "MoKD training diagnostics"
) -> str:
    """Writes the losses, gradient cosines, norm ratios and weights of a run to `png_path`.

    Drawn on a `Figure` with the Agg canvas, not through pyplot, so it needs no display
    and leaves no global figure state behind in the trainer's process. Returns `png_path`.
    """
    scalars = read_scalars(events_dir)
    figure = Figure(figsize=(12, 8), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    losses, cosines, ratios, weights = figure.subplots(2, 2).flat

    draw_series(losses, scalars, "loss_")
    losses.set_yscale("log")
    losses.set_title("per-objective losses")

    draw_series(cosines, scalars, "cos_")
    cosines.axhline(0.0, color="black", linewidth=0.8)
    cosines.axhspan(-1.05, 0.0, color="tab:red", alpha=0.07)
    cosines.text(0.01, 0.03, "conflict (cos < 0)", color="tab:red", transform=cosines.transAxes)
    cosines.set_ylim(-1.05, 1.05)
    cosines.set_title("cos(g_task, g_k)")

    draw_series(ratios, scalars, "norm_ratio")
    ratios.axhline(1.0, color="black", linewidth=0.8)
    ratios.set_yscale("log")
    ratios.set_title("norm ratio ||g_k|| / ||g_task||")

    draw_series(weights, scalars, "weight_")
    weights.set_title("aggregation weights")

    figure.suptitle(title)
    png = io.BytesIO()
    canvas.print_png(png)
    epath.Path(png_path).write_bytes(png.getvalue())  # local or a URL such as gs://
    return png_path
