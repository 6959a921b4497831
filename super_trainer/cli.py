"""``super-trainer``: train a recipe from the command line (Hydra).

    super-trainer                                   # the default recipe, digits_mlp
    super-trainer --config-name=NAME key=value ...  # a recipe under recipes/, with overrides
    super-trainer --config-dir DIR --config-name=MY # your own recipes (they may use the shipped groups)
    super-trainer -m training_hyperparams.initial_lr=0.1,0.01   # a sweep: one run dir per job, a summary at the end
    super-trainer --cfg job                         # print the composed recipe, train nothing
    super-trainer --nproc 4 ...                     # launch 4 processes with torchrun

Exit codes: 0 when training ends (completed or stopped by a callback), 1 on bad input or another error (one
line on stderr; ``HYDRA_FULL_ERROR=1`` shows the traceback) or when any job of a sweep failed, 130 after Ctrl-C,
143 after SIGTERM (preemption).
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import sg_compat
from .checkpoint import CheckpointError
from .runs import RunLockedError
from .distributed import is_main_process
from .loop.stops import Terminated
from .recipes import _compose, recipe_names, recipes_dir
from .registry import close_matches
from .sweep import JobOutcome, SweepSummary, new_sweep, sweep_run_name
from .trainer import Trainer

__all__ = ["main"]

DEFAULT_RECIPE = "digits_mlp"
_state: Dict[str, Any] = {"full_error": False, "config_dir": None, "sweep": None, "config_name": DEFAULT_RECIPE}


def _help() -> str:
    shipped = recipes_dir()
    groups = "\n".join(f"  {d.name}: {', '.join(recipe_names(d))}" for d in sorted(shipped.iterdir())
                       if d.is_dir() and list(d.glob("*.yaml")))
    return f"""usage: super-trainer [--config-name=RECIPE] [--config-dir DIR] [-m] [--cfg job] [--nproc N] [key=value...]

Train a recipe (see docs/recipes.md). Without --config-name: {DEFAULT_RECIPE}.

shipped recipes: {', '.join(recipe_names(shipped))}  (default is an alias of {DEFAULT_RECIPE})
recipe groups (group=option):
{groups}

options:
  --config-name=RECIPE   a recipe by name (shipped, or in --config-dir)
  --config-dir DIR       search DIR for recipes first (then the shipped ones: they may use its groups and `base`)
  -m, --multirun         a sweep, e.g. -m training_hyperparams.initial_lr=0.1,0.01: every job runs, each in its
                         run dir <ckpt_root_dir>/<experiment_name>/<job>_<its overrides>/ (e.g. 0_initial_lr=0.1);
                         then one summary table (job, overrides, best metric, stop_reason, error), also
                         written as sweep_<time>.csv beside the runs (with Hydra's config as sweep_<time>.yaml)
  --cfg job              print the composed recipe and train nothing
  --nproc N              launch N processes with torchrun (distributed data parallel)
  key=value              override any recipe key, e.g. training_hyperparams.max_epochs=10 experiment_name=longer
  --hydra-help           Hydra's own options

exit codes:
  0    training ended (completed, or stopped by a callback); in a sweep: every job did
  1    bad input (an unknown recipe, key or name, a bad value, ...) or another error: one line on stderr;
       set HYDRA_FULL_ERROR=1 for the traceback. A failed run leaves existing run dirs unchanged; a run dir
       in use by another live process is refused (the error names its pid). In a sweep: any job failed (the
       others still ran)
  130  interrupted by Ctrl-C (ckpt_latest.pth holds the state at the batch where training stopped); a sweep
       stops there
  143  terminated by SIGTERM, as a cluster scheduler preempts a job (ckpt_latest.pth holds the state at the
       batch where training stopped, written before exit; resume with training_hyperparams.resume=true)
"""


def _pop_nproc(argv: List[str]) -> Optional[int]:
    for i, arg in enumerate(argv):
        if arg == "--nproc" and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
        elif arg.startswith("--nproc="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            continue
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"super-trainer: error: --nproc takes a number of processes >= 1, got {value!r}")
        return int(value)
    return None


def _launch(nproc: int, argv: List[str]) -> int:
    """torchrun, in this process: each rank reports its own error in one line, so torchrun's traceback and
    failure summary are left out. The exit code is 0, 130 when a rank was interrupted, 143 when terminated
    (SIGTERM, forwarded by torchrun to every rank), else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # the OMP_NUM_THREADS banner, SIGTERMs
        logging.getLogger(name).setLevel(logging.ERROR if name.endswith("run") else logging.CRITICAL)
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "super_trainer.train_from_recipe", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode in (130, 143):
            return failure.exitcode
        if failure.exitcode != 1:  # a rank that died without reporting (a signal, a crash)
            sys.stderr.write(f"super-trainer: error: rank {rank} failed with exit code {failure.exitcode}\n")
        return 1
    except SignalException as err:
        return 143 if err.sigval == signal.SIGTERM else 130
    except KeyboardInterrupt:
        return 130
    return 0


def _option(argv: List[str], long: str, short: str) -> Optional[str]:
    """The value of ``--long VALUE``, ``--long=VALUE`` or ``-short VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg in (long, short) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return None


def _config_dir(argv: List[str]) -> Optional[str]:
    return _option(argv, "--config-dir", "-cd")


# Hydra's options that take a value (argparse splits the overrides around them).
_VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
           "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _user_dir_first(argv: List[str], extra_overrides: List[str]) -> List[str]:
    """argv with the shipped recipes as Hydra's ``--config-dir`` (searched after the primary dir), for an app whose
    primary dir is the user's: so the user's files win over shipped files of the same name (SG's
    ``default_train_params.yaml`` over ours), while the shipped groups and ``base`` stay available.
    ``extra_overrides`` join the user's overrides (argparse takes the overrides as one run of arguments)."""
    out: List[str] = []
    first_override: Optional[int] = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        takes_value = arg in _VALUED or (arg in ("--info", "-i") and argv[i + 1:i + 2] and argv[i + 1] in _INFO_CHOICES)
        if arg in ("--config-dir", "-cd") or arg.startswith("--config-dir="):
            i += 2 if takes_value else 1  # the user's dir is the app's primary dir now
            continue
        if not arg.startswith("-") and first_override is None:
            first_override = len(out)
        out.extend(argv[i:i + 2] if takes_value else [arg])
        i += 2 if takes_value else 1
    at = len(out) if first_override is None else first_override
    return ["--config-dir", str(recipes_dir()), *out[:at], *extra_overrides, *out[at:]]


def _sg_callback_overrides(config_dir: str, argv: List[str]) -> List[str]:
    """Overrides pointing the recipe's Hydra callbacks into super_gradients (SG's variable_setup) at their equivalents."""
    name = _option(argv, "--config-name", "-cn") or DEFAULT_RECIPE

    def compose() -> Optional[DictConfig]:
        try:
            return _compose(Path(config_dir).resolve(), name, [], hydra_node=True)
        except Exception:  # Hydra reports what is wrong when it composes the run itself
            return None

    return sg_compat.hydra_callback_overrides(compose)


def _experiment_dir(cfg: DictConfig) -> Path:
    """``<ckpt_root_dir>/<experiment_name>``: each run makes its own run dir in it (``.hydra/`` and recipe.yaml go
    there too). A sweep's job is named by its ``run_id``: the recipe's, else ``sweep.sweep_run_name`` of the job's
    overrides (``<job>_<key>=<value>,...``; an earlier sweep's name gets this sweep's stamp)."""
    hydra_cfg = HydraConfig.get()
    experiment_dir = Path(sg_compat.ckpt_root(cfg.get("ckpt_root_dir"))) / str(cfg.experiment_name)  # SG's null
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.get("training_hyperparams") is not None \
            and cfg.training_hyperparams.get("run_id") is None:
        with open_dict(cfg):
            cfg.training_hyperparams.run_id = sweep_run_name(experiment_dir, list(hydra_cfg.overrides.task),
                                                             hydra_cfg.job.num)
    return experiment_dir


def _run(cfg: DictConfig) -> None:
    """The Hydra task: train the composed recipe (``_app`` makes the Hydra app around it); in a sweep, one job."""
    if sg_compat.uses_shortcuts(sg_compat.hydra_callbacks_in(HydraConfig.get())):
        sg_compat.apply_recipe_shortcuts(cfg)  # again for each job of a sweep (SG applies them at run start only)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _run_sweep_job(cfg)
        return
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        experiment_dir = _experiment_dir(cfg)
        result = Trainer(experiment_name=experiment_dir.name, ckpt_root_dir=experiment_dir.parent,
                         device=cfg.get("device")).train(cfg)
    except Exception as err:
        if _state["full_error"]:
            raise
        _remove_if_empty(output_dir)  # Hydra made it before the job started
        _fail(err)
    _report(cfg, result)
    if result.stop_reason == "interrupted":
        sys.exit(130)
    if result.stop_reason == "terminated":
        sys.exit(143)


def _run_sweep_job(cfg: DictConfig) -> None:
    """One job of a sweep: its outcome goes to the summary; a failure is reported in one line and the sweep goes
    on (Hydra runs the next job); Ctrl-C ends the sweep."""
    hydra_cfg = HydraConfig.get()
    experiment_dir = _experiment_dir(cfg)
    if _state["sweep"] is None:
        _state["sweep"] = SweepSummary(experiment_dir)
        if is_main_process():
            _state["sweep"].keep_hydra_config(Path(hydra_cfg.sweep.dir))
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    run_dir = experiment_dir / str(cfg.training_hyperparams.get("run_id") or "")
    outcome = JobOutcome(job=hydra_cfg.job.num, overrides=overrides, run_dir=str(run_dir), stop_reason="error")
    try:
        result = Trainer(experiment_name=experiment_dir.name, ckpt_root_dir=experiment_dir.parent,
                         device=cfg.get("device")).train(cfg)
    except Exception as err:
        if _state["full_error"]:
            raise
        _remove_if_empty(Path(hydra_cfg.runtime.output_dir))
        outcome.error = describe_error(err, _state["config_dir"])
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"super-trainer: error: job {outcome.job} ({' '.join(overrides)}): {outcome.error}\n")
    else:
        _report(cfg, result)
        outcome.stop_reason, outcome.best_metric, outcome.best_epoch = \
            result.stop_reason, result.best_metric, result.best_epoch
        outcome.metric_to_watch, outcome.run_dir = result.metric_to_watch, str(result.ckpt_dir)
    if is_main_process():
        _state["sweep"].add(outcome)
    if outcome.stop_reason == "interrupted":
        raise KeyboardInterrupt  # past Hydra's launcher, which would go on with the next job
    if outcome.stop_reason == "terminated":
        raise Terminated  # preempted: the sweep ends with 143


def _report(cfg: DictConfig, result: Any) -> None:
    if is_main_process():
        best = f"{result.best_metric:.4f}" if isinstance(result.best_metric, float) else result.best_metric
        watched = cfg.training_hyperparams.get("metric_to_watch", "Accuracy")
        where = f" in epoch {result.best_epoch + 1} (best_epoch={result.best_epoch}, 0-based)" \
            if result.best_epoch is not None else ""  # 1-based like the epoch lines above it
        run_dir = Path(result.ckpt_dir)
        print(f"{run_dir.parent.name}/{run_dir.name}: {result.stop_reason}; best {watched} {best}{where}")
        quoted = shlex.quote(str(result.ckpt_dir))  # copy-pasteable into a shell, also with spaces in the path
        print(f"run dir: {quoted}  (tensorboard --logdir {quoted})")


def _app(config_dir: Optional[str]) -> Callable[[], None]:
    """The Hydra app; its primary config dir is the user's ``--config-dir`` when given, else the shipped recipes."""
    primary = str(Path(config_dir).resolve()) if config_dir else str(recipes_dir())
    return hydra.main(config_path=primary, config_name=DEFAULT_RECIPE, version_base="1.3")(_run)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()  # only succeeds when empty
    except OSError:
        pass


# errors of bad input (a name, a value, a file): reported by their message alone
INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError, ImportError, HydraException, OmegaConfBaseException,
                CheckpointError, RunLockedError)


def describe_error(err: BaseException, config_dir: Optional[str] = None) -> str:
    """One line for ``err``: the message of a bad input as it is; the file and line of a YAML syntax error;
    the valid choices of Hydra's "could not find" errors; the type of any other exception."""
    import yaml

    cause: Optional[BaseException] = err
    while cause is not None:
        mark = getattr(cause, "problem_mark", None)
        if isinstance(cause, yaml.YAMLError) and mark is not None:
            return (f"YAML syntax error in {mark.name}, line {mark.line + 1}, column {mark.column + 1}: "
                    f"{getattr(cause, 'problem', None) or _one_line(str(cause))}")
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, MissingConfigException):
        if str(err).startswith("Cannot find primary config"):
            names = recipe_names()
            if config_dir and Path(config_dir).is_dir():
                names += recipe_names(Path(config_dir))
            missing = err.missing_cfg_file or str(err).split("'")[1]
            return f"unknown recipe {missing!r}; recipes: {', '.join(sorted(set(names)))}"
        first = str(err).split("\n\n")[0].strip()
        options = f"; available: {', '.join(err.options)}" if err.options else ""
        return _one_line(first) + options
    message = _one_line(str(err))
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:  # Hydra only hints at "+key=value"; a typo deserves the key it was meant to be
        return _unknown_override(unknown.group(1), config_dir)
    if isinstance(err, (ValueError, HydraException, OmegaConfBaseException, CheckpointError, RunLockedError)):
        return message
    if isinstance(err, INPUT_ERRORS):  # TypeError, ImportError, ...: the type says what went wrong
        return f"{type(err).__name__}: {message}"
    return f"{type(err).__name__}: {message} (HYDRA_FULL_ERROR=1 shows the traceback)"


def _unknown_override(key: str, config_dir: Optional[str]) -> str:
    """One line for an override of a key the recipe does not have: the closest existing key (looked up in the
    recipe composed without overrides, segment by segment), and how to add a new key on purpose."""
    hint = ""
    try:
        directory = Path(config_dir).resolve() if config_dir and Path(config_dir).is_dir() else recipes_dir()
        node: Any = _compose(directory, _state["config_name"], [])
        meant: List[str] = []
        for part in key.split("."):
            if not isinstance(node, DictConfig):
                break
            match = [part] if part in node else close_matches(part, [str(k) for k in node.keys()], n=1)
            if not match:
                break
            meant.append(match[0])
            node = node[match[0]]
        if len(meant) == len(key.split(".")) and ".".join(meant) != key:
            hint = f"; did you mean {'.'.join(meant)!r}?"
        elif "training_hyperparams" in key:
            hint = " (docs/training_params.md lists every key)"
    except Exception:  # the hint is a courtesy: the error stands without it
        hint = ""
    return f"unknown recipe key {key!r}{hint} (to add a new key on purpose: +{key}=...)"


def _one_line(text: str) -> str:
    """The lines of a message joined, without Hydra's search-path listing and documentation links."""
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Config search path") or line.startswith("provider="):
            break
        if line and not line.startswith("See https://") and not line.startswith("Set the environment variable"):
            kept.append(line)
    return " ".join(kept) or text.strip()


def _format_warning(message: Union[Warning, str], category: type, filename: str, lineno: int,
                    line: Optional[str] = None) -> str:
    return f"super-trainer: warning: {message}\n"  # one line, without the source line Python would quote


def _fail(err: BaseException) -> None:
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        sys.stderr.write(f"super-trainer: error: {describe_error(err, _state['config_dir'])}\n")
    elif not isinstance(err, INPUT_ERRORS):  # bad input fails alike on every rank: rank 0 reports it
        sys.stderr.write(f"super-trainer: error: rank {rank}: {describe_error(err, _state['config_dir'])}\n")
    sys.exit(1)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    """Entry point of ``super-trainer`` and ``python -m super_trainer.train_from_recipe``."""
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        print(_help())
        sys.exit(0)
    nproc = _pop_nproc(argv)
    if nproc and nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        sys.exit(_launch(nproc, argv))
    format_warning, warnings.formatwarning = warnings.formatwarning, _format_warning
    _state["full_error"] = os.environ.get("HYDRA_FULL_ERROR") == "1"
    config_dir = _state["config_dir"] = _config_dir(argv)
    _state["config_name"] = _option(argv, "--config-name", "-cn") or DEFAULT_RECIPE
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises its errors (instead of printing a traceback) ...
    on_sigterm = signal.signal(signal.SIGTERM, _terminate)  # outside training too (training defers it to a batch end)
    new_sweep(argv)
    _state["sweep"] = None
    try:
        sg_compat.register_resolvers()
        if config_dir and Path(config_dir).is_dir():
            argv = _user_dir_first(argv, _sg_callback_overrides(config_dir, argv))
        else:
            config_dir = None  # Hydra names a missing --config-dir itself
        sys.argv = [sys.argv[0], *argv]
        _app(config_dir)()
    except Terminated:  # a SIGTERM outside training (e.g. while building), or a second one during it
        _end_sweep()
        sys.exit(143)
    except KeyboardInterrupt:  # raised outside training (e.g. while building): same code as during it
        _end_sweep()
        sys.exit(130)
    except Exception as err:  # ... and they are reported here in one line
        if _state["full_error"]:
            raise
        _end_sweep()
        _fail(err)
    finally:  # as they were: main() may run inside another program (a notebook, a test)
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
        warnings.formatwarning = format_warning
        signal.signal(signal.SIGTERM, on_sigterm)
    if _end_sweep():
        sys.exit(1)


def _end_sweep() -> bool:
    """After a sweep: print its summary table (rank 0); True when any job failed."""
    summary, _state["sweep"] = _state["sweep"], None
    if summary is None or not summary.outcomes:
        return False
    if is_main_process():
        print(summary.table(), flush=True)
    return bool(summary.failed)


if __name__ == "__main__":
    main()
