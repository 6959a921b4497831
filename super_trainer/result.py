"""``TrainingResult``: what ``Trainer.train`` returns, readable in a terminal and in a notebook.

``repr(result)`` summarises the run (stop reason, best metric and epoch, directories); in Jupyter,
``_repr_html_`` shows one table row per epoch with the best epoch highlighted; ``plot()`` draws the loss,
metric and lr curves (matplotlib, the ``[plot]`` extra) and ``to_dataframe()`` returns the history as a
pandas DataFrame.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["TrainingResult"]

_BEST_STYLE = "background-color:#d9f2d9;font-weight:bold"


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is one number (int, float, 0-d/1-element tensor or array), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item) and (size is None or (size() if callable(size) else size) == 1):
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def _plain(value: Any) -> Any:
    """Python numbers stay as they are; a one-element tensor/array becomes a float."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    number = _number(value)
    return value if number is None else number


def _fmt(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{number:.4g}"


@dataclasses.dataclass(repr=False)
class TrainingResult:
    """What ``Trainer.train`` returns (SPEC §2).

    ``history`` has one dict per epoch run: ``epoch`` (0-based), ``lr``, ``seconds`` and ``train/<name>``,
    ``valid/<name>`` for every metrics_dict key. ``metric_to_watch`` and ``loss_names`` tell which history
    columns are the watched metric and the losses (used by ``plot`` and the HTML table).
    """

    best_metric: Optional[float]
    best_epoch: Optional[int]  # 0-based
    metrics: Dict[str, Any]  # the last validation's metrics_dict
    history: List[Dict[str, Any]]  # one dict per completed epoch
    test_metrics: Dict[str, Dict[str, Any]]  # test loader name -> metrics_dict
    ckpt_dir: str
    best_ckpt_path: Optional[str]
    latest_ckpt_path: Optional[str]
    stop_reason: str
    metric_to_watch: Optional[str] = None
    loss_names: List[str] = dataclasses.field(default_factory=list)

    # ---- names -------------------------------------------------------------------------------------
    def _watched_key(self) -> Optional[str]:
        """The metrics_dict key of metric_to_watch as spelled in the history (matched case-insensitively)."""
        if not self.metric_to_watch:
            return None
        wanted = self.metric_to_watch.lower()
        for row in self.history:
            for key in row:
                if key.startswith("valid/") and key[len("valid/"):].lower() == wanted:
                    return key[len("valid/"):]
        return self.metric_to_watch

    def _is_loss(self, name: str) -> bool:
        if self.loss_names:
            return name in self.loss_names or name.split("/")[0] in self.loss_names
        return "loss" in name.lower()

    def columns(self) -> List[str]:
        """The history's columns in display order: epoch, train/…, valid/…, lr, seconds, then any others."""
        seen: Dict[str, None] = {}
        for row in self.history:
            seen.update(dict.fromkeys(row))
        keys = list(seen)
        ordered = ["epoch"] if "epoch" in seen else []
        ordered += [k for k in keys if k.startswith("train/")]
        ordered += [k for k in keys if k.startswith("valid/")]
        ordered += [k for k in ("lr", "seconds") if k in seen]
        return ordered + [k for k in keys if k not in ordered]

    # ---- text ----------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        watched = self._watched_key() or "metric"
        lines = [f"TrainingResult(stop_reason={self.stop_reason!r}, epochs run: {len(self.history)})"]
        if self.best_metric is not None:
            lines.append(f"  best {watched}: {_fmt(self.best_metric)} at epoch {self.best_epoch} (0-based)")
        else:
            lines.append(f"  best {watched}: none (no validation ran)")
        if self.metrics:
            lines.append("  last validation: " + "  ".join(f"{k}={_fmt(v)}" for k, v in self.metrics.items()))
        for name, values in self.test_metrics.items():
            lines.append(f"  test {name!r}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        lines.append(f"  ckpt_dir: {self.ckpt_dir}")
        lines.append(f"  best_ckpt_path: {self.best_ckpt_path}")
        lines.append(f"  latest_ckpt_path: {self.latest_ckpt_path}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """A table with one row per epoch (Jupyter calls this); the best epoch's row is highlighted."""
        columns = self.columns()
        escape = html.escape
        watched = self._watched_key()
        summary = f"<b>TrainingResult</b>: {escape(self.stop_reason)} after {len(self.history)} epoch(s)"
        if self.best_metric is not None:
            summary += (f"; best {escape(str(watched))} <b>{escape(_fmt(self.best_metric))}</b> "
                        f"at epoch {self.best_epoch}")
        summary += f"; <code>{escape(str(self.ckpt_dir))}</code>"
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        rows = []
        for row in self.history:
            best = self.best_epoch is not None and row.get("epoch") == self.best_epoch
            style = f' style="{_BEST_STYLE}"' if best else ""
            cells = "".join(f"<td>{escape(_fmt(row.get(c)))}</td>" for c in columns)
            rows.append(f"<tr{style}>{cells}</tr>")
        body = "\n".join(rows)
        return (f'<div class="super-trainer-result"><p>{summary}</p>\n'
                f'<table class="super-trainer-history">\n<thead><tr>{head}</tr></thead>\n'
                f"<tbody>\n{body}\n</tbody>\n</table></div>")

    # ---- pandas ------------------------------------------------------------------------------------
    def to_dataframe(self) -> Any:
        """The history as a pandas DataFrame indexed by (0-based) epoch, columns as in ``columns()``."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("TrainingResult.to_dataframe() needs pandas: pip install super-trainer[notebook] "
                              "(or pip install pandas)") from err
        columns = self.columns()
        frame = pd.DataFrame([{c: _plain(row.get(c)) for c in columns} for row in self.history], columns=columns)
        return frame.set_index("epoch") if "epoch" in frame.columns else frame

    # ---- matplotlib ----------------------------------------------------------------------------------
    def _series(self, key: str) -> tuple:
        xs, ys = [], []
        for row in self.history:
            value = _number(row.get(key))
            if value is not None and math.isfinite(value):
                xs.append(row.get("epoch", len(xs)))
                ys.append(value)
        return xs, ys

    def plot(self, path: Union[str, Path, None] = None) -> Any:
        """Draw loss, metric and lr curves against the (0-based) epoch; return the matplotlib Figure.

        With ``path``, also save it as a PNG (1200×360 pixels). The figure is not registered with pyplot,
        so it works headless (rendered by Agg), is not drawn twice in Jupyter, and leaks nothing across
        calls. Needs matplotlib: ``pip install super-trainer[plot]``.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
        except ImportError as err:
            raise ImportError("TrainingResult.plot() needs matplotlib: pip install super-trainer[plot]") from err

        fig = _figure_class()(figsize=(12, 3.6), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)  # render with Agg whatever the pyplot backend is (no display needed)
        loss_ax, metric_ax, lr_ax = fig.subplots(1, 3)
        columns = self.columns()
        for key in columns:
            split, _, name = key.partition("/")
            if split not in ("train", "valid"):
                continue
            xs, ys = self._series(key)
            if not xs:
                continue
            ax = loss_ax if self._is_loss(name) else metric_ax
            ax.plot(xs, ys, marker="o", markersize=3, linestyle="-" if split == "valid" else "--", label=key)
        watched = self._watched_key()
        if self.best_epoch is not None and self.best_metric is not None:
            metric_ax.axvline(self.best_epoch, color="gray", linestyle=":", linewidth=1)
            metric_ax.plot([self.best_epoch], [self.best_metric], marker="*", markersize=12, color="gold",
                           markeredgecolor="black", linestyle="none", label=f"best {watched}")
        xs, ys = self._series("lr")
        if xs:
            lr_ax.plot(xs, ys, marker="o", markersize=3, color="tab:purple", label="lr")
            if min(ys) > 0 and max(ys) / min(ys) > 100:
                lr_ax.set_yscale("log")
        for ax, title in ((loss_ax, "loss"), (metric_ax, "metrics"), (lr_ax, "learning rate")):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        if path is not None:
            fig.savefig(path, format="png")
        return fig


@functools.lru_cache(maxsize=None)
def _figure_class() -> type:
    """A matplotlib Figure subclass, defined on first use so importing super_trainer never needs matplotlib."""
    from matplotlib.figure import Figure

    class ResultFigure(Figure):
        """A Figure that Jupyter can show even when pyplot was never imported (it has ``_repr_png_``)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return ResultFigure
