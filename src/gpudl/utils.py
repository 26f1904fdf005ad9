"""Helpers around the Hydra configs in conf/: find them, compose a config without the command
line (tests, notebooks), and decide the W&B mode."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig, open_dict


def repo_root() -> Path:
    """The repository holding conf/ and scripts/ (the package is installed editable from src/)."""
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """conf/ of the repository, or $GPUDL_CONFIG_DIR."""
    path = Path(os.environ.get("GPUDL_CONFIG_DIR") or repo_root() / "conf")
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"gpudl: no train.yaml in the config folder {path}; set GPUDL_CONFIG_DIR to the conf/ folder")
    return path


def compose(overrides: list[str] | None = None, config_name: str = "train", output_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose conf/<config_name>.yaml with command-line style overrides, as `scripts/train.py`
    would, and make it usable by `gpudl.train.train` outside `@hydra.main`:

        cfg = compose(["experiment=linreg_toy", "logger=csv"], output_dir="/tmp/run")
        metrics = train(cfg)

    `output_dir` becomes paths.output_dir (and hydra.runtime.output_dir); default: a fresh
    timestamped folder as hydra.run.dir would give. The returned config has no `hydra` node.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    with open_dict(cfg):
        if output_dir is None:
            output_dir = cfg.hydra.run.dir  # resolves the timestamp now
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "0"
    # ${hydra:...} interpolations (paths.output_dir) read this singleton.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


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
