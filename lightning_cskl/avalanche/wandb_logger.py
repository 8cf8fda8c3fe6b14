"""A small Weights & Biases logger for Avalanche, offline by default.

Avalanche 0.6's own ``WandBLogger`` does not work with current wandb (it calls ``wandb.util.generate_id``
and ``wandb.viz.CustomChart``, both gone; ContinualAI/avalanche#1674). This one logs what an evaluation
plugin emits: every scalar metric of one callback in one W&B step, plus a summary at the end of a run.
Offline runs land in ``<dir>/wandb/offline-run-*``; upload them later with ``wandb sync <that folder>``.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from avalanche.logging import BaseLogger

if TYPE_CHECKING:
    from avalanche.evaluation.metric_results import MetricValue

__all__ = ["WandbLogger"]


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        return float(value.item())
    return None


class WandbLogger(BaseLogger):
    """Log Avalanche metrics to W&B; ``mode="offline"`` (default) needs no account and no network.

    Args:
        project: W&B project.
        name: run name (W&B picks one if None).
        config: hyper-parameters to store with the run (plain values).
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        dir: folder under which ``wandb/`` is created (default: the working directory).
        run_id: W&B run id, e.g. to continue a run with ``resume="allow"``.
        **init_kwargs: further ``wandb.init`` arguments (``tags``, ``group``, ``resume``, ...).

    Example:
        >>> # logger = WandbLogger(project="cskl", config={"channel_ratio": 0.75})
        >>> # evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[logger])
        >>> # ... train ...; logger.finish()   then, with a network:  wandb sync wandb/offline-run-*
    """

    def __init__(
        self,
        project: str = "lightning_cskl",
        name: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        mode: Literal["offline", "online", "disabled"] = "offline",
        dir: Union[str, os.PathLike, None] = None,
        run_id: Optional[str] = None,
        **init_kwargs: Any,
    ) -> None:
        super().__init__()
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"mode={mode!r} is not allowed: use 'offline', 'online' or 'disabled'")
        import wandb

        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        init_kwargs.setdefault("reinit", "create_new")  # two runs in one process are two runs, not one
        self.run = wandb.init(
            project=project, name=name, config=config, mode=mode, dir=None if dir is None else str(dir),
            id=run_id, **init_kwargs,
        )

    @property
    def run_dir(self) -> Optional[Path]:
        """The local folder of this run (``.../wandb/offline-run-*`` when offline)."""
        files = getattr(self.run, "dir", None)
        return Path(files).parent if files else None

    def log_metrics(self, metric_values: list["MetricValue"]) -> None:
        """Log the scalar metrics of one callback as one W&B step (non-scalar values are skipped)."""
        payload: dict[str, float] = {}
        for metric in metric_values:
            values = metric.value if isinstance(metric.value, dict) else {None: metric.value}
            for key, value in values.items():
                scalar = _scalar(value)
                if scalar is not None:
                    payload[metric.name if key is None else f"{metric.name}/{key}"] = scalar
        if payload:
            self.run.log(payload)

    def log_single_metric(self, name: str, value: Any, x_plot: int) -> None:
        scalar = _scalar(value)
        if scalar is not None:
            self.run.log({name: scalar})

    def log_summary(self, values: dict[str, Any]) -> None:
        """Store end-of-run values (ACC, forgetting, the accuracy matrix as nested lists) in the run summary."""
        self.run.summary.update(values)

    def finish(self) -> None:
        """Close the run (flushes the offline files); call it before starting another run."""
        self.run.finish()
