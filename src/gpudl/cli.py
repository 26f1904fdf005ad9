"""The command lines: `gpudl-train` and `gpudl-eval` (installed console scripts), also run by
`python scripts/train.py` and `python scripts/eval.py` in a checkout. Hydra composes the configs
that ship inside the package (pkg://gpudl.conf) with the command-line overrides.

    gpudl-train experiment=logreg_cancer optimizer=gd logger=csv
    gpudl-train -m model.optimizer.lr=1e-3,1e-2 seed=1,2            # a sweep
    gpudl-eval run_dir=logs/logreg_cancer/runs/<timestamp>          # test the checkpoint the run tested

Outputs land under paths.root_dir = $GPUDL_ROOT (scripts/ sets it to the checkout), else the
working directory: logs/<task_name>/runs/<timestamp>/, multiruns under logs/<task_name>/multiruns/.
Lightning and the models are imported only once Hydra has composed the config, so `--help` and a
mistyped override answer at once.

Exit status: 0 done; 2 a mistake in the config or the command line (an unknown config name or
key, an override that does not parse, a bad value), reported in one line with the closest names;
1 a failed run (a NaN loss, an error while training); 128 + N interrupted by signal N.
"""

from __future__ import annotations

import difflib
import os
import sys
from importlib import resources
from typing import Any, Callable

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig

CONFIGS = "pkg://gpudl.conf"


def _config_groups() -> list[str]:
    """The config groups shipped in gpudl.conf (experiment, model, trainer, ...)."""
    return sorted(p.name for p in resources.files("gpudl.conf").iterdir() if p.is_dir() and not p.name.startswith("_"))


def _closest(name: str, candidates: list[str], prefix: str = "") -> str:
    """'closest: <prefix>a, <prefix>b', or every candidate when none is close."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if close:
        return "closest: " + ", ".join(prefix + c for c in close)
    return "expected one of: " + ", ".join(prefix + c for c in sorted(candidates))


def _describe_composition_error(err: Exception) -> str:
    """One line for a mistake Hydra found while composing the config."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"no {group or 'config'} named {name!r}; {_closest(name, list(err.options))}"
    cause = err.__cause__  # an unknown key: OmegaConf's error names it and the node it is missing from
    full_key, parent = str(getattr(cause, "full_key", "") or ""), getattr(cause, "parent_node", None)
    if full_key and parent is not None and hasattr(parent, "keys"):
        prefix, _, key = full_key.rpartition(".")
        candidates = {str(k) for k in parent.keys()} - {"hydra"}
        if not prefix:  # a top-level key may be a misspelled config group
            candidates |= set(_config_groups())
        closest = _closest(key, sorted(candidates), prefix + "." if prefix else "")
        return f"no key {full_key!r} in the config; {closest}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = lines[: next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))]
    return "; ".join(lines)


def _reporting_config_errors(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """Run a @hydra.main function so that a mistake Hydra finds while composing the config ends in
    one line naming it and the closest names, with exit status 2 (Hydra's own report exits 1 and
    suggests `+key=...`, which adds a key no object accepts)."""

    def run() -> Any:
        previous = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of reporting and exiting
        try:
            return hydra_main()
        except (ConfigCompositionException, OverrideParseException) as err:
            print(f"gpudl: config error: {_describe_composition_error(err)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            if previous is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = previous

    run.__doc__ = hydra_main.__doc__
    return run


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def _train_job(cfg: DictConfig) -> float | None:
    """Train one job; returns cfg.optimized_metric's value to Hydra's sweepers (None for a failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gpudl.callbacks import NonFiniteLossError, TrainingInterrupted
    from gpudl.train import ConfigError, train

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    fail_fast = cfg.get("fail_fast")
    if fail_fast is None:
        fail_fast = not multirun  # a sweep goes on past a failed job; a single run fails
    try:
        metrics = train(cfg)
    except TrainingInterrupted as err:
        # Preempted or Ctrl+C: the checkpoint is saved; stop the whole process (and sweep).
        print(f"gpudl: {err}; resume with the same overrides plus "
              f"hydra.run.dir={cfg.paths.output_dir} ckpt_path=last", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except Exception as err:
        if not fail_fast:
            # train() wrote the error into this job's metrics.json (status: failed); the summary
            # lists it. None, not NaN: the Optuna sweeper (1.3 with optuna 2.10) marks a None
            # trial FAIL and goes on (max_failure_rate), but crashes on NaN (it tells twice).
            print(f"gpudl: job failed and recorded in {cfg.paths.output_dir}/metrics.json; the sweep goes on: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return None
        if isinstance(err, ConfigError):
            # A mistake in the config: one clear line, no traceback; exit status 2 like argparse.
            print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if isinstance(err, NonFiniteLossError):
            print(f"gpudl: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None  # train() warned if it was not logged


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def _eval_job(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint of a finished run; prints and returns the test metrics."""
    from gpudl.train import ConfigError, evaluate

    try:
        return evaluate(cfg)
    except ConfigError as err:
        print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


train_main = _reporting_config_errors(_train_job)
eval_main = _reporting_config_errors(_eval_job)
