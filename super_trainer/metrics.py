"""Metrics: building torchmetrics objects from training_params, naming them, averaging losses.

``metrics_dict`` keys are the loss names first, then metric titles (SPEC §2):

- loss: the loss's class name (``CrossEntropyLoss``), or ``LossClass/<component>`` for each component when
  the loss returns ``(loss, components)``; component names come from ``loss_logging_items_names``, else the
  loss's ``component_names`` attribute, else ``loss_0``, ``loss_1``, …
- metrics: the registry name for metrics built by name, the mapping key for ``{title: Metric}``, else the
  metric's class name. A compound metric (SuperGradients' kind, e.g. DetectionMetrics: a ``component_names`` list and
  a ``compute()`` that returns a dict) gives one key per component instead, named as the component (SG's keys).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torchmetrics import Metric, MetricCollection

from .registry import METRICS, parse_spec

__all__ = ["Accuracy", "Top5", "build_metrics", "loss_names", "LossAverager", "metric_values", "lookup_metric",
           "check_default_metrics", "warn_non_finite_metrics", "metric_titles", "LossAverageMeter", "metric_states",
           "load_metric_states", "update_metrics"]


@METRICS.register("Accuracy")
class Accuracy(Metric):
    """Top-k classification accuracy from logits ``(N, C)`` and class indices ``(N,)`` (or one-hot ``(N, C)``).

    Needs no ``num_classes``; states are sums, so torchmetrics syncs them across ranks.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = top_k
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if target.dim() == preds.dim() and target.dim() > 1:  # one-hot or soft labels
            target = target.argmax(dim=1)
        if preds.dim() == target.dim():  # already class indices
            correct = preds.eq(target).sum()
        else:
            if preds.shape[1] < self.top_k:  # topk's own error ("selected index k out of range") names nothing
                raise ValueError(f"{type(self).__name__}: top_k={self.top_k} needs at least {self.top_k} classes, "
                                 f"but the model outputs {preds.shape[1]}")
            top = preds.topk(self.top_k, dim=1).indices
            correct = top.eq(target.unsqueeze(1)).any(dim=1).sum()
        self.correct += correct
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


@METRICS.register("Top5")
class Top5(Accuracy):
    """Top-5 accuracy."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("top_k", 5)
        super().__init__(**kwargs)


def build_metrics(spec: Any, key: str) -> Dict[str, Metric]:
    """Build ``{title: Metric}`` from a training_params metrics list (``key`` names it in errors).

    Items may be Metric instances (titled by class name), registry names, ``{Name: params}`` (titled by
    Name); the whole value may also be one mapping ``{title: Metric instance}``.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping) and spec and all(isinstance(v, Metric) for v in spec.values()):
        return _checked(dict(spec), key)
    if isinstance(spec, (str, Mapping, Metric)):
        spec = [spec]
    metrics: Dict[str, Metric] = {}
    for item in spec:
        if isinstance(item, Metric):
            title, metric = type(item).__name__, item
        elif isinstance(item, Mapping) and item and all(isinstance(v, Metric) for v in item.values()):
            for title, metric in item.items():
                _add_metric(metrics, str(title), metric, key)
            continue
        else:
            name, params = parse_spec(item, "metric")
            if name is None:
                raise ValueError(
                    f"{key}: {item!r} is not a metric; give a torchmetrics Metric, a registered name "
                    "(e.g. 'Accuracy') or {Name: {params}}"
                )
            try:
                metric = METRICS.build({name: params}) if name != "_target_" else METRICS.build(params)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            title = name if name != "_target_" else type(metric).__name__
        _add_metric(metrics, title, metric, key)
    return _checked(metrics, key)


def _checked(metrics: Dict[str, Metric], key: str) -> Dict[str, Metric]:
    try:
        metric_titles(metrics)  # component names of compound metrics must not collide either
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    return metrics


def check_default_metrics(params: Any, target: Any) -> None:
    """ValueError when ``valid_metrics_list`` was not given (so the default ``["Accuracy"]`` scores validation)
    and ``target`` (a validation target, or a batch of them) is not class indices: float targets that are not
    one-hot or probability rows (regression) would be scored 0 every epoch and the best epoch stuck at the first.
    ``params``: the resolved TrainingParams (it records which keys took their default)."""
    if "valid_metrics_list" not in getattr(params, "defaulted", ()):
        return
    if not isinstance(target, torch.Tensor) or not target.is_floating_point() or _class_rows(target):
        return
    shape = tuple(target.shape)
    raise ValueError(f"training_params.valid_metrics_list: not given, so the default ['Accuracy'] would score "
                     f"validation, but the targets are {target.dtype} {shape} (regression?) and Accuracy needs class "
                     "indices: give metrics for the task (e.g. valid_metrics_list: [] and metric_to_watch: your loss's "
                     "name, or a torchmetrics regression metric such as MeanSquaredError)")


def _class_rows(target: torch.Tensor) -> bool:
    """One-hot or probability rows over classes (dim 1): non-negative, each summing to 1."""
    if target.dim() < 2 or target.numel() == 0:
        return False
    rows = target.detach().float()
    return bool((rows >= 0).all()) and bool(torch.allclose(rows.sum(dim=1), torch.ones(()), atol=1e-3))


def warn_non_finite_metrics(metrics: Mapping[str, Any], metric_to_watch: Optional[str] = None,
                            where: str = "validation") -> List[str]:
    """Warn, naming them, about the NaN or infinite values of ``metrics`` (a metrics_dict); returns their keys.
    A NaN ``metric_to_watch`` never counts as an improvement, so ckpt_best stays at the last finite epoch."""
    bad = [key for key, value in metrics.items() if not _finite(value)]
    if bad:
        shown = ", ".join(f"{key}={metrics[key]!r}" for key in bad)
        watched = metric_to_watch is not None and any(k.lower() == metric_to_watch.lower() for k in bad)
        warnings.warn(f"{where} metrics are not finite: {shown}"
                      + ("; it is metric_to_watch, so this epoch cannot become the best (ckpt_best is not updated)"
                         if watched else ""), UserWarning, stacklevel=2)
    return bad


def _finite(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return not isinstance(value, float) or math.isfinite(value)


def _add_metric(metrics: Dict[str, Metric], title: str, metric: Metric, key: str) -> None:
    if title in metrics:
        raise ValueError(f"{key}: two metrics are titled {title!r}; give them distinct titles as {{title: Metric}}")
    metrics[title] = metric


def loss_names(criterion: Any, component_names: Optional[Sequence[str]] = None, n_components: int = 0) -> List[str]:
    """The metrics_dict keys of a loss: its class name, or ``LossClass/<component>`` per component."""
    base = getattr(criterion, "__name__", None) or type(criterion).__name__
    names = component_names or getattr(criterion, "component_names", None)
    if names:
        return [f"{base}/{n}" for n in names]
    if n_components:
        return [f"{base}/loss_{i}" for i in range(n_components)]
    return [base]


def lookup_metric(metrics: Mapping[str, Any], name: str) -> Optional[Any]:
    """``metrics[name]``, matching the key case-insensitively; None when absent."""
    if name in metrics:
        return metrics[name]
    lowered = name.lower()
    return next((v for k, v in metrics.items() if k.lower() == lowered), None)


def metric_titles(metrics: Mapping[str, Metric]) -> List[str]:
    """The metrics_dict keys ``metrics`` ({title: Metric}) produce, in order: a compound metric's component names in
    place of its title. ValueError when two keys collide."""
    keys: List[str] = []
    for title, metric in metrics.items():
        components = getattr(metric, "component_names", None)
        for key in ([str(c) for c in components] if components else [title]):
            if key in keys:
                raise ValueError(f"metrics: two metrics produce the key {key!r} (the component names of compound metrics "
                                 "are metrics_dict keys); give distinct titles or component names")
            keys.append(key)
    return keys


def metric_values(collection: MetricCollection) -> Dict[str, Any]:
    """The collection's results as plain Python numbers (lists for non-scalar results), in title order; a compound
    metric's dict result gives one entry per component (SG skips its "additional_items" entry, and so do we)."""
    values: Dict[str, Any] = {}
    for title in collection.titles:
        metric = collection[title]
        value = metric.compute()
        if isinstance(value, Mapping):
            names = getattr(metric, "component_names", None) or [k for k in value if k != "additional_items"]
            missing = [n for n in names if n not in value]
            if missing:
                raise ValueError(f"metric {title}: compute() returned keys {list(value)} but component_names lists "
                                 f"{missing} too")
            values.update((str(name), _plain(value[name])) for name in names)
        else:
            values[title] = _plain(value)
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value
def metric_states(collection: Optional[MetricCollection]) -> Optional[Dict[str, Dict[str, Any]]]:
    """Each metric's accumulated state (its declared ``add_state`` values: tensors or lists of tensors) and its
    update count, by title: what a mid-epoch checkpoint needs to continue the epoch's metrics (torchmetrics keeps
    these out of ``state_dict`` by default). Plain tensors and lists, so ``weights_only`` loads them."""
    if collection is None:
        return None
    states: Dict[str, Dict[str, Any]] = {}
    for title, metric in collection.items(keep_base=True, copy_state=False):
        saved = {name: getattr(metric, name) for name in metric._defaults}
        states[title] = {"states": saved, "update_count": int(metric._update_count)}
    return states


def load_metric_states(collection: Optional[MetricCollection], states: Optional[Mapping[str, Any]],
                       device: torch.device) -> None:
    """Put back what :func:`metric_states` returned (on ``device``); metrics it does not name keep their state."""
    if collection is None or not states:
        return
    for title, metric in collection.items(keep_base=True, copy_state=False):
        saved = states.get(title)
        if saved is None:
            continue
        for name, value in saved["states"].items():
            if name in metric._defaults:
                setattr(metric, name, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
        metric._update_count = saved["update_count"]
        metric._computed = None


def make_collection(metrics: Dict[str, Metric], device: torch.device) -> Optional[MetricCollection]:
    """One MetricCollection on ``device`` (None when there are no metrics)."""
    if not metrics:
        return None
    collection = MetricCollection(metrics, compute_groups=False).to(device)
    collection.titles = list(metrics)  # MetricCollection sorts its keys; metrics_dict keeps the given order
    collection.context_arguments = _context_arguments(metrics.values())
    return collection


def _context_arguments(metrics: Any) -> tuple:
    """The names a metric's ``update()`` takes besides the prediction and the target (SG's DetectionMetrics:
    ``device``, ``inputs``): SG's MetricsUpdateCallback calls ``update(**context.__dict__)``, so SG metrics read
    any context field by its name. Named parameters only (a ``**kwargs`` does not ask for anything)."""
    names = set()
    for metric in metrics:
        try:
            parameters = list(inspect.signature(metric.update).parameters.values())
        except (TypeError, ValueError):
            continue
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names.update(p.name for p in named[2:])  # the first two are the prediction and the target
    return tuple(sorted(names))


def update_metrics(collection: MetricCollection, preds: Any, target: Any, context: Any) -> None:
    """``collection.update(preds, target)``, plus the context fields a metric's update() names (each metric gets
    only the ones its own signature takes: torchmetrics filters them). A name the context does not have is left
    out: a metric that requires it fails with torch's "missing argument" naming it."""
    wanted = getattr(collection, "context_arguments", ())  # a MetricCollection made elsewhere: none
    if not wanted:
        collection.update(preds, target)
        return
    collection.update(preds, target, **{name: getattr(context, name) for name in wanted if hasattr(context, name)})


def _rows(items: List[torch.Tensor]) -> torch.Tensor:
    """Batch items (0-d or (K,)) as one (batches, K) tensor."""
    return torch.stack(items).reshape(len(items), -1)


class LossAverager:
    """Mean of per-batch loss items over an epoch. Batches only append a detached tensor (no host sync, no
    arithmetic on the hot path); the mean is taken once, in float64, when the epoch's metrics are read.

    The items a finiteness check has read are kept as the ``(n, K)`` block it stacked for that read, so the epoch's
    mean stacks each item once (not again at the end), and a long epoch keeps one tensor per check, not per batch.

    A batch added with its number of samples counts by it (SuperGradients' ``loss_avg_meter.update(items,
    len(inputs))``): evaluation does so, so a smaller last batch, and the ranks' differently cut shares under
    torchrun, give one process's value. Training adds batch means unweighted (its batches are equal but for a
    last one), which keeps the hot path free of a size lookup."""

    def __init__(self) -> None:
        self._blocks: List[torch.Tensor] = []  # (n, K) rows already checked: stacked by a check, or restored
        self._items: List[torch.Tensor] = []  # items added since the last check
        self._samples: List[int] = []  # per batch, when added with a sample count

    def reset(self) -> None:
        self._blocks = []
        self._items = []
        self._samples = []

    def _all_rows(self) -> Optional[torch.Tensor]:
        """Every batch's items so far as one ``(batches, K)`` tensor (None before the first batch)."""
        if self._items:
            fresh = _rows(self._items)
            return torch.cat([*self._blocks, fresh]) if self._blocks else fresh
        if not self._blocks:
            return None
        return self._blocks[0] if len(self._blocks) == 1 else torch.cat(self._blocks)

    def stacked(self) -> Optional[torch.Tensor]:
        """The items so far as one ``(batches, K)`` tensor on the CPU (for a mid-epoch checkpoint)."""
        rows = self._all_rows()
        return rows.cpu() if rows is not None else None

    def load(self, stacked: Optional[torch.Tensor]) -> None:
        """Continue from what ``stacked()`` returned (a resumed epoch's average covers the whole epoch)."""
        self.reset()
        if stacked is not None:
            self._blocks = [stacked]  # read finite before it was written

    def all_finite_since_check(self) -> bool:
        """Whether every item added since the last call is finite: one host sync, O(items since then). A NaN or
        Inf item makes the items' float64 sum NaN or Inf, and finite loss items cannot overflow it (float32 ones
        sum to at most ~1e40; float64 ones would need values beyond ~1e306)."""
        if not self._items:
            return True
        block = _rows(self._items)
        self._blocks.append(block)
        self._items = []
        return math.isfinite(block.sum(dtype=torch.float64).item())

    def add(self, items: torch.Tensor, samples: Optional[int] = None) -> None:
        """Add one batch's detached loss items: a 0-d loss or a ``(K,)`` components tensor; ``samples``: the
        batch's number of samples, to weight it by (given for every batch of a pass, or for none)."""
        self._items.append(items)
        if samples is not None:
            self._samples.append(samples)

    def average(self) -> List[float]:
        """The mean over batches (and over ranks when distributed), weighted by samples when they were given;
        one host sync. Under torchrun every rank must call it, also one without batches (an evaluation share
        smaller than a batch): the ranks first agree on the number of loss items (one more small all-reduce per
        pass), so such a rank takes part in the sum with zeros."""
        distributed = dist.is_available() and dist.is_initialized()
        rows = self._all_rows()
        if not distributed and rows is not None and not (self._samples and len(self._samples) == rows.shape[0]):
            # one process, unweighted (training's batch means): one reduction in float64 and one sync
            return [total / rows.shape[0] for total in rows.sum(dim=0, dtype=torch.float64).tolist()]
        stacked = rows.to(torch.float64) if rows is not None else None
        if distributed:
            width = _largest_on_any_rank(0 if stacked is None else stacked.shape[1])
            if width == 0:
                return []
            if stacked is None:
                stacked = torch.zeros((0, width), dtype=torch.float64)
        elif stacked is None:
            return []
        if self._samples and len(self._samples) == stacked.shape[0]:
            weights = torch.tensor(self._samples, dtype=torch.float64, device=stacked.device)
            total, count = (stacked * weights[:, None]).sum(dim=0), weights.sum().reshape(1)
        else:
            total = stacked.sum(dim=0)
            count = torch.tensor([float(stacked.shape[0])], dtype=torch.float64, device=total.device)
        if distributed:
            packed = _on_backend_device(torch.cat([total, count]))
            dist.all_reduce(packed)
            total, count = packed[:-1], packed[-1:]
        return (total / count).tolist() if count.item() else []


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the process group's collectives take it (NCCL: the current GPU)."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.cuda()
    return tensor


def _largest_on_any_rank(value: int) -> int:
    tensor = _on_backend_device(torch.tensor([value], dtype=torch.int64))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class LossAverageMeter:
    """``context.loss_avg_meter`` (SuperGradients' meaning): the running average of the running pass's loss items,
    read as ``.average`` (a float for one item, a tuple for components). The trainer adds every batch's
    ``loss_log_items`` itself, so ``update()`` is refused rather than counted twice."""

    def __init__(self, averager: LossAverager) -> None:
        self._averager = averager

    @property
    def average(self) -> Any:
        """0 before the first batch, as SG's AverageMeter; this process's batches only, as SG's (one host sync per
        read, no collective, so any rank may read it any time)."""
        stacked = self._averager.stacked()
        if stacked is None:
            return 0
        values = stacked.to(torch.float64).mean(dim=0).tolist()
        return values[0] if len(values) == 1 else tuple(values)

    def update(self, value: Any, batch_size: int = 1) -> None:
        raise RuntimeError("context.loss_avg_meter is kept by the trainer (every batch's loss_log_items are added to "
                           "it); read .average instead of updating it")
