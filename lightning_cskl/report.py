"""How a run is shown: its accuracy matrix as text and as a heatmap (used by ``cskl run`` and the comparison's plots)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["draw_matrix", "format_matrix", "save_heatmap"]


def format_matrix(accuracy: Sequence[Sequence[float]]) -> str:
    """The accuracy matrix as text: row i after training experience i, column j tested on experience j.

    Example:
        >>> print(format_matrix([[0.9, 0.1], [0.8, 0.95]]))
        after \\ on   exp0   exp1
        exp0        0.900      -
        exp1        0.800  0.950
    """
    columns = len(accuracy[0]) if accuracy else 0
    lines = ["after \\ on " + " ".join(f"{f'exp{j}':>6}" for j in range(columns))]
    for i, row in enumerate(accuracy):
        cells = [f"{v:6.3f}" if j <= i else f"{'-':>6}" for j, v in enumerate(row)]
        lines.append(f"{f'exp{i}':<10} " + " ".join(cells))
    return "\n".join(lines)


def draw_matrix(axes: Any, accuracy: Sequence[Sequence[float]], annotate: bool = True) -> Any:
    """Draw an accuracy matrix on matplotlib ``axes`` (experiences not yet trained greyed out); return the image.

    ``annotate`` writes each seen value in its cell (skipped above 144 cells)."""
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(accuracy, dtype=float)
    rows, columns = values.shape
    shown = np.ma.masked_array(values, mask=np.triu(np.ones_like(values, dtype=bool), k=1))
    image = axes.imshow(shown, vmin=0.0, vmax=1.0, cmap=plt.get_cmap("viridis").with_extremes(bad="#dddddd"))
    if annotate and rows * columns <= 144:
        for i in range(rows):
            for j in range(min(i + 1, columns)):
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                          color="black" if values[i, j] > 0.6 else "white", fontsize=8)
    return image


def save_heatmap(accuracy: Sequence[Sequence[float]], path: Path, title: str) -> None:
    """Write the accuracy matrix as a heatmap PNG (unseen experiences greyed out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(accuracy), len(accuracy[0]) if accuracy else 0
    figure, axes = plt.subplots(figsize=(max(3.5, 0.6 * columns + 2), max(3.0, 0.6 * rows + 1.5)))
    image = draw_matrix(axes, accuracy)
    axes.set_xlabel("tested on experience j")
    axes.set_ylabel("after training experience i")
    axes.set_xticks(range(columns))
    axes.set_yticks(range(rows))
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
