"""Pictures of adversarial examples: the grid that ``advgrad show`` draws (needs matplotlib).

One row per example: the clean image, the adversarial image (both on the data's value
range) and the perturbation ``x_adv - x`` on a diverging colormap whose scale is symmetric
around 0 and shared by every row. matplotlib is imported inside the functions that draw, and
only its object-oriented API is used (no pyplot, no global backend), so importing this module
is cheap and drawing leaves no state behind.

Every string drawn comes from a file (class names, attributes): it is shown through
:func:`figure_text`, which escapes control characters and mathtext's ``$``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

import numpy as np

from advgrad.errors import printable

DPI = 100
PANEL_PX = 160
"""Width and height of one image panel."""
TITLE_PX = 40
"""Room above a panel for its two-line title."""
ROW_GAP_PX = 14
COLUMN_GAP_PX = 28
LEFT_PX = 24
COLORBAR_GAP_PX = 14
COLORBAR_PX = 14
RIGHT_PX = 84
"""Room right of the colorbar for its ticks and label."""
HEADER_PX = 56
"""Room above the first row for the figure's title."""
BOTTOM_PX = 10
TITLE_FONT_SIZE = 8.5
HEADER_FONT_SIZE = 10
MAX_NAME_CHARS = 14
"""Class names longer than this are cut (with an ellipsis) so that titles never overlap."""
MAX_HEADER_CHARS = 80
PERTURBATION_COLORMAP = "RdBu_r"


@dataclass(frozen=True)
class ShownRows:
    """Rows of an attack's output as ``advgrad show`` draws them.

    Attributes
    ----------
    index : (n,) int64
        Row numbers in the output, in the order drawn.
    clean, adversarial : (n, h, w) or (n, h, w, 3) float64
        The images (grey or RGB).
    true_class : (n,) int64 or None
        The dataset's labels (the most likely class of soft labels); None: no labels.
    pred_clean, pred_adv : (n,) int64
        The model's predictions of the clean and the adversarial images.
    confidence_clean, confidence_adv : (n,) float64
        The probability the model gives each prediction.
    class_names : tuple of str or None
        One per class, as the files name them (None: the class indices).
    value_range : (float, float)
        Pixel values drawn from black to white.
    title : tuple of str
        The lines of the figure's title, as the files say them (escaped when drawn).
    """

    index: np.ndarray
    clean: np.ndarray
    adversarial: np.ndarray
    true_class: np.ndarray | None
    pred_clean: np.ndarray
    pred_adv: np.ndarray
    confidence_clean: np.ndarray
    confidence_adv: np.ndarray
    class_names: tuple[str, ...] | None
    value_range: tuple[float, float]
    title: tuple[str, ...]

    @property
    def perturbation(self) -> np.ndarray:
        """``adversarial - clean`` (n, h, w), float64; of RGB images, per pixel the channel's
        change with the largest magnitude (its sign kept)."""
        change = self.adversarial - self.clean
        if change.ndim == 3:
            return change
        largest = np.argmax(np.abs(change), axis=-1)[..., np.newaxis]
        return np.take_along_axis(change, largest, axis=-1)[..., 0]


def require_matplotlib(command: str) -> None:
    """Check that matplotlib can be imported.

    Raises
    ------
    ValueError
        It cannot: "``command`` needs matplotlib: pip install 'advgrad[plot]'".
    """
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise ValueError(f"{command} needs matplotlib: pip install 'advgrad[plot]'") from error


def figure_text(value: object, limit: int) -> str:
    """``value`` as matplotlib draws it literally on one line: control characters escaped
    (``advgrad.errors.printable``), ``$`` not read as mathtext, at most ``limit`` characters
    (a longer text ends in an ellipsis)."""
    text = printable(value)
    if len(text) > limit:
        text = text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"
    return text.replace("$", r"\$")


def class_label(k: int, class_names: tuple[str, ...] | None) -> str:
    """Class ``k`` as a title shows it: its name, or its index when the files name none."""
    name = str(k) if class_names is None else class_names[k]
    return figure_text(name, MAX_NAME_CHARS)


def panel_titles(shown: ShownRows, i: int) -> tuple[str, str, str]:
    """The titles of row ``i``'s clean, adversarial and perturbation panels, two lines each.

    The clean panel names the row, its true class and the clean prediction with its
    confidence; the adversarial panel the adversarial prediction with its confidence; the
    perturbation panel its L-inf and L2 norms.
    """
    names = shown.class_names
    if shown.true_class is None:
        true = "no label"
    else:
        true = f"true {class_label(shown.true_class[i], names)}"
    change = shown.adversarial[i] - shown.clean[i]
    return (
        f"row {shown.index[i]}, {true}\n"
        f"clean: {class_label(shown.pred_clean[i], names)} "
        f"({100 * shown.confidence_clean[i]:.1f}%)",
        f"adversarial\n{class_label(shown.pred_adv[i], names)} "
        f"({100 * shown.confidence_adv[i]:.1f}%)",
        f"perturbation\nL\N{INFINITY} {np.abs(change).max():.3g}, "
        f"L2 {np.linalg.norm(change.ravel()):.3g}",
    )


def perturbation_limit(shown: ShownRows) -> float:
    """The end of the perturbation scale, shared by every row: it runs from ``-limit`` to
    ``limit``, the largest magnitude of a drawn perturbation (1 when every one is 0)."""
    largest = float(np.abs(shown.perturbation).max(initial=0.0))
    return largest if largest > 0 else 1.0


def grid_pixels(n_rows: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of a grid of ``n_rows`` rows and 3 columns."""
    width = LEFT_PX + 3 * PANEL_PX + 2 * COLUMN_GAP_PX + COLORBAR_GAP_PX + COLORBAR_PX + RIGHT_PX
    height = HEADER_PX + n_rows * (TITLE_PX + PANEL_PX) + (n_rows - 1) * ROW_GAP_PX + BOTTOM_PX
    return width, height


def grid_figure(shown: ShownRows):
    """The grid of ``shown`` as a matplotlib ``Figure`` of ``grid_pixels(n)`` at ``DPI``.

    Panels sit at fixed places, so no title overlaps an image whatever the number of rows;
    images keep their aspect and are drawn pixel for pixel (no smoothing). The adversarial
    panel's title is red when the attack changed the prediction.
    """
    from matplotlib.figure import Figure

    n_rows = len(shown.index)
    width, height = grid_pixels(n_rows)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)

    def box(left_px: float, top_px: float, width_px: float, height_px: float):
        """Axes at a place given in pixels from the top-left corner."""
        bottom = height - top_px - height_px
        return figure.add_axes(
            (left_px / width, bottom / height, width_px / width, height_px / height)
        )

    figure.suptitle(
        "\n".join(figure_text(line, MAX_HEADER_CHARS) for line in shown.title),
        y=1 - (HEADER_PX / 2) / height,
        va="center",
        fontsize=HEADER_FONT_SIZE,
    )
    low, high = shown.value_range
    limit = perturbation_limit(shown)
    perturbation = shown.perturbation
    image_settings = {"interpolation": "nearest", "aspect": "equal"}
    drawn = None
    for i in range(n_rows):
        top = HEADER_PX + i * (TITLE_PX + PANEL_PX + ROW_GAP_PX) + TITLE_PX
        titles = panel_titles(shown, i)
        changed = shown.pred_adv[i] != shown.pred_clean[i]
        for column in range(3):
            axes = box(LEFT_PX + column * (PANEL_PX + COLUMN_GAP_PX), top, PANEL_PX, PANEL_PX)
            axes.set_xticks([])
            axes.set_yticks([])
            if column < 2:
                image = (shown.clean, shown.adversarial)[column][i]
                if image.ndim == 2:
                    axes.imshow(image, cmap="gray", vmin=low, vmax=high, **image_settings)
                else:
                    axes.imshow(np.clip((image - low) / (high - low), 0, 1), **image_settings)
            else:
                drawn = axes.imshow(
                    perturbation[i],
                    cmap=PERTURBATION_COLORMAP,
                    vmin=-limit,
                    vmax=limit,
                    **image_settings,
                )
            color = "tab:red" if column == 1 and changed else "black"
            axes.set_title(titles[column], fontsize=TITLE_FONT_SIZE, color=color, pad=3)
    colorbar_left = LEFT_PX + 3 * PANEL_PX + 2 * COLUMN_GAP_PX + COLORBAR_GAP_PX
    rows_height = height - HEADER_PX - BOTTOM_PX - TITLE_PX
    colorbar = figure.colorbar(
        drawn, cax=box(colorbar_left, HEADER_PX + TITLE_PX, COLORBAR_PX, rows_height)
    )
    colorbar.set_label("perturbation x_adv - x", fontsize=TITLE_FONT_SIZE)
    colorbar.ax.tick_params(labelsize=TITLE_FONT_SIZE)
    return figure


def save_grid(shown: ShownRows, handle: IO[bytes]) -> None:
    """Draw the grid of ``shown`` (``grid_figure``) as PNG into the open binary ``handle``."""
    grid_figure(shown).savefig(handle, format="png", dpi=DPI)


def plot_curves(evaluation, path) -> None:
    """Accuracy against eps, one line per method, saved as an image at ``path``.

    Parameters
    ----------
    evaluation : advgrad.evaluate.Evaluation
    path : str, os.PathLike or a binary file object
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for method in dict.fromkeys(point.method for point in evaluation.points):
        points = [point for point in evaluation.points if point.method == method]
        axes.plot([p.eps for p in points], [p.accuracy for p in points], marker="o", label=method)
    axes.set_xlabel(f"eps (L{evaluation.norm})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"Accuracy under attack ({evaluation.n_rows} rows)")
    figure.tight_layout()
    figure.savefig(path)
