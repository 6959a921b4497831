"""CLI sweeps (``super-trainer -m``): each job's run name, made from its overrides, and the summary of all jobs.

A job's run dir is ``<ckpt_root_dir>/<experiment_name>/<run name>/``; the shipped ``base`` recipe asks Hydra for it
through the ``super_trainer.sweep_run`` resolver registered here. At the end the CLI prints one table and writes it
as ``sweep_<YYYYMMDD>_<HHMMSS>_<microseconds>.csv`` beside the runs (Hydra's ``multirun.yaml`` becomes
``sweep_<same stamp>.yaml`` there, so a later sweep does not overwrite it).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

__all__ = ["run_name", "sweep_run_name", "new_sweep", "SweepSummary", "JobOutcome", "RESOLVER"]

RESOLVER = "super_trainer.sweep_run"
MAX_NAME_CHARS = 80  # of the overrides part; a longer one is cut and ends with a hash of the whole list
_IGNORED_KEYS = ("experiment_name", "ckpt_root_dir")  # where the run goes, not what it trains
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_sweep: Dict[str, Any] = {"stamp": "", "names": {}, "swept": None}  # this process's sweep: see new_sweep()


def new_sweep(command_line: Sequence[str] = ()) -> str:
    """Start a sweep (the CLI calls it once per command): a new stamp for its file names, no names given yet, and
    the keys that the command line sweeps over (``a=1,2``, ``range(...)``, ...), which alone name the runs."""
    _sweep.update(stamp=datetime.datetime.now().strftime("%Y%m%d_%H%M%S_%f"), names={},
                  swept=swept_keys(command_line))
    return _sweep["stamp"]


def swept_keys(command_line: Sequence[str]) -> Optional[List[str]]:
    """The keys of the sweep overrides among ``command_line``; None when there are none (or they do not parse),
    so runs are named after all their overrides (a sweep defined in the recipe's ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [arg for arg in command_line if "=" in arg and not arg.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(given)
    except Exception:  # Hydra reports a bad override itself
        return None
    return [o.key_or_group for o in overrides if o.is_sweep_override()] or None


def run_name(overrides: Sequence[str], job_num: int, swept: Optional[Sequence[str]] = None) -> str:
    """A readable, filesystem-safe name for a sweep job: ``<job number>_<key>=<value>,...`` with each key cut to
    its last dotted part (longer where two would clash), e.g. ``1_initial_lr=0.01,max_epochs=3``. Only the
    ``swept`` keys when given (the others are the same in every job); never ``experiment_name``,
    ``ckpt_root_dir``, ``hydra.*`` or ``resume`` (a resumed sweep keeps its names). Unique within a sweep through
    the job number; past MAX_NAME_CHARS, whole overrides are left out and a hash of all of them is added."""
    items: List[Tuple[str, str]] = []
    for override in overrides:
        key, sep, value = str(override).partition("=")
        key = key.lstrip("+~")  # added, or deleted (no value)
        if key in _IGNORED_KEYS or key.startswith("hydra.") or key.split(".")[-1] == "resume":
            continue
        if swept is not None and key not in swept:
            continue
        items.append((key, _safe(value) if sep else "deleted"))
    keys = _short_keys([key for key, _ in items])
    parts = [f"{_safe(key)}={value}" for key, (_, value) in zip(keys, items)]
    text = ",".join(parts) or "defaults"
    if len(text) > MAX_NAME_CHARS:  # whole items while they fit, then how many were left out and a hash of all
        digest = hashlib.sha1("\n".join(map(str, overrides)).encode()).hexdigest()[:8]
        kept = 0
        while kept < len(parts) and len(",".join(parts[:kept + 1])) <= MAX_NAME_CHARS - 16:
            kept += 1
        head = ",".join(parts[:kept]) if kept else parts[0][:MAX_NAME_CHARS - 16]
        text = f"{head},+{len(parts) - max(kept, 1)}_{digest}"
    return f"{job_num}_{text}"


def sweep_run_name(sweep_dir: Any, overrides: Sequence[str], job_num: int) -> str:
    """``run_name``, unless a dir of that name already exists in ``sweep_dir`` (an earlier sweep's) and the job
    does not resume: then ``_<sweep stamp>`` is added, so a new sweep never writes into an earlier run. The same
    arguments give the same name for the whole sweep (Hydra resolves it more than once)."""
    names: Dict[Tuple[str, int, Tuple[str, ...]], str] = _sweep["names"]
    key = (str(Path(str(sweep_dir)).resolve()), int(job_num), tuple(map(str, overrides)))
    if key not in names:
        name = run_name(overrides, job_num, _sweep["swept"])
        if (Path(key[0]) / name).exists() and not _resumes(overrides):
            name = f"{name}_{_sweep['stamp'] or new_sweep()}"
        names[key] = name
    return names[key]


def _resolve_run_name(job_num: Any, overrides: Any, sweep_dir: Any) -> str:
    plain = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else overrides
    return sweep_run_name(sweep_dir, list(plain or []), int(job_num))


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, _resolve_run_name)


def _short_keys(keys: List[str]) -> List[str]:
    """Each key's shortest dotted suffix that no other key shares."""
    parts = [key.split(".") for key in keys]
    depth = [1] * len(keys)
    while True:
        names = [".".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashes:
            return names
        for i in clashes:
            depth[i] += 1


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text.strip("'\"")).strip("_") or "empty"


def _resumes(overrides: Sequence[str]) -> bool:
    return any(str(o).split("=")[0].split(".")[-1] == "resume" and str(o).split("=")[-1].lower() == "true"
               for o in overrides)


@dataclasses.dataclass
class JobOutcome:
    """One sweep job: what it was given and how it ended (``error`` is the one-line message of a failed job)."""

    job: int
    overrides: List[str]
    run_dir: str
    stop_reason: str
    metric_to_watch: Optional[str] = None
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    error: str = ""


class SweepSummary:
    """The outcomes of a sweep's jobs; the CSV is rewritten after each job, so it is there even if the sweep dies."""

    COLUMNS = ("job", "overrides", "run_dir", "metric_to_watch", "best_metric", "best_epoch", "stop_reason", "error")

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.csv_path = self.runs_dir / f"sweep_{_sweep['stamp'] or new_sweep()}.csv"
        self.outcomes: List[JobOutcome] = []

    @property
    def failed(self) -> List[JobOutcome]:
        return [o for o in self.outcomes if o.error]

    def add(self, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)
        self._write_csv()

    def keep_hydra_config(self, sweep_dir: Path) -> None:
        """Hydra writes ``multirun.yaml`` into the sweep dir at every sweep: rename it to this sweep's stamp."""
        multirun = Path(sweep_dir) / "multirun.yaml"
        if multirun.is_file() and multirun.parent.resolve() == self.runs_dir.resolve():
            multirun.replace(self.csv_path.with_suffix(".yaml"))

    def _write_csv(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.COLUMNS)
            writer.writeheader()
            for outcome in self.outcomes:
                row = dataclasses.asdict(outcome)
                row["overrides"] = " ".join(outcome.overrides)
                writer.writerow({k: "" if v is None else v for k, v in row.items()})
        os.replace(tmp, self.csv_path)

    def table(self) -> str:
        """The summary as aligned text: overrides shared by every job are shown once, above the table."""
        shared = [o for o in self.outcomes[0].overrides if all(o in x.overrides for x in self.outcomes)] \
            if self.outcomes else []
        rows = [("job", "overrides", "best metric", "stop_reason", "error")]
        for o in self.outcomes:
            best = f"{o.metric_to_watch}={_fmt(o.best_metric)}" if o.best_metric is not None else "-"
            own = " ".join(x for x in o.overrides if x not in shared) or "-"
            rows.append((str(o.job), own, best, o.stop_reason, o.error))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        title = f"sweep: {len(self.outcomes)} job(s), {len(self.failed)} failed"
        if self.outcomes and self.outcomes[-1].stop_reason == "interrupted":
            title += f", stopped by Ctrl-C in job {self.outcomes[-1].job} (the jobs after it did not run)"
        if shared:
            title += f"; every job: {' '.join(shared)}"
        return "\n".join([title, *(line.rstrip() for line in lines), f"summary: {shlex.quote(str(self.csv_path))}"])


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
