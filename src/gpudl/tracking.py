"""What a job leaves behind to compare runs by: its W&B run and its JSON record.

W&B: offline unless the user is logged in or sets WANDB_MODE (`choose_wandb_mode`); one W&B run
per job, grouped by sweep in a multirun (`wandb_arguments`); a resumed run continues its W&B run
through the id kept in <run dir>/wandb_id.txt; `finish_wandb` closes the job's run. `wandb` is
imported only when a W&B logger is configured.

Records: <run dir>/metrics.json (train) or eval_metrics.json (evaluate), written by rank 0:
status "ok" with the metrics, or "failed"/"interrupted" with the error (`record_failure`), so a
sweep's summary lists every job.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id.txt"  # in the run folder: the W&B run a resumed run continues


# --------------------------------------------------------------------------- W&B
def wandb_logged_in() -> bool:
    """True when W&B can authenticate without a prompt: WANDB_API_KEY, or a netrc entry for the
    W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), "_netrc" if os.name == "nt" else ".netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str:
    """Set WANDB_MODE=offline unless the user set WANDB_MODE or is logged in: with no login and
    no network, an online wandb.init would prompt or wait. Returns the mode in effect."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if wandb_logged_in():
        return "online"
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def wandb_logger_names(cfg: DictConfig) -> list[str]:
    """The entries of cfg.logger that build a WandbLogger."""
    node = cfg.get("logger")
    if not isinstance(node, DictConfig):
        return []
    return [k for k, v in node.items()
            if isinstance(v, DictConfig) and str(v.get("_target_", "")).endswith("WandbLogger")]


def wandb_arguments(cfg: DictConfig, output_dir: Path, ckpt_path: str | os.PathLike | None,
                    job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per W&B logger entry: the run id (kept in <run dir>/wandb_id.txt; a resumed run reads it
    from its own folder or the checkpoint's run folder and continues that W&B run), and in a
    multirun group = <group>-<sweep folder name> (one group per sweep) and job_type = the job's
    overrides."""
    names = wandb_logger_names(cfg)
    if not names:
        return {}
    import secrets
    import string

    run_id = None
    if ckpt_path:
        for folder in (output_dir, Path(ckpt_path).resolve().parent.parent):
            saved = folder / WANDB_ID_FILE
            if saved.is_file() and saved.read_text().strip():
                run_id = saved.read_text().strip()
                break
    out = {}
    for name in names:
        node = cfg.logger[name]
        new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        args: dict[str, Any] = {"id": node.get("id") or run_id or new_id, "resume": "allow"}
        if job.get("multirun"):
            args["group"] = f"{node.get('group') or cfg.get('task_name')}-{output_dir.parent.name}"
            overrides = [o for o in job.get("overrides", []) if not o.startswith("experiment=")]
            args["job_type"] = (",".join(overrides) or "train")[:64]  # W&B's limit
        out[name] = args
    return out


def save_wandb_id(output_dir: Path, wandb_args: dict[str, dict[str, Any]]) -> None:
    if wandb_args:
        (output_dir / WANDB_ID_FILE).write_text(next(iter(wandb_args.values()))["id"] + "\n")


def finish_wandb(failed: bool) -> None:
    """Close the W&B run of this job (a multirun starts a new one per job)."""
    if "wandb" not in sys.modules:  # never imported: no run to close
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def log_backend_summary(loggers: list[Any], report: dict[str, Any]) -> None:
    """Put the kernel backend each op ran on into the W&B run's summary: `kernels/backend` (the
    setting) and `kernels/<op>` (triton, torch or mixed), next to the metrics."""
    summary = {"kernels/backend": report.get("setting")}
    summary.update({f"kernels/{op}": side for op, side in report.get("ops", {}).items()})
    for logger in loggers or []:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.summary.update(summary)


# --------------------------------------------------------------------------- the job's record
def hydra_job() -> dict[str, Any]:
    """What Hydra knows about this job: multirun or not, the job's command-line overrides. Empty
    outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        multirun = str(hc.get("mode")) == "RunMode.MULTIRUN"
        overrides = [str(o) for o in (hc.overrides.task or [])] if "overrides" in hc else []
        return {"multirun": multirun, "overrides": overrides}
    except Exception:  # a partial Hydra config (e.g. built by hand): no job information
        return {}


def rank() -> int:
    """This process's global rank from the launcher's environment (0 outside distributed runs)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def record_failure(cfg: DictConfig, err: BaseException, filename: str) -> None:
    """<run dir>/<filename> of a failed job: status, error type and message, the job's overrides."""
    if rank() != 0:
        return
    try:
        output_dir = Path(cfg.paths.output_dir)
    except Exception:
        return  # no run folder to write into
    callbacks = sys.modules.get("gpudl.callbacks")  # not imported yet: not a TrainingInterrupted
    signaled = callbacks is not None and isinstance(err, callbacks.TrainingInterrupted)
    interrupted = signaled or isinstance(err, KeyboardInterrupt)
    metric = cfg.get("optimized_metric", None)
    record = {
        "status": "interrupted" if interrupted else "failed",
        "error_type": type(err).__name__,
        "error": str(err),
        "task_name": cfg.get("task_name"),
        "overrides": hydra_job().get("overrides", []),
        "metrics": {},
        "optimized_metric": metric if isinstance(metric, str) else None,
        "optimized_metric_value": None,
        "seed": cfg.get("seed", None),
    }
    if signaled:
        record["last_checkpoint"] = err.checkpoint
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_record(output_dir / filename, record)
    except OSError as os_err:
        log.warning("could not record the failure in %s: %s", output_dir, os_err)
