"""Where the Hydra configs are, and composing one without the command line (tests, notebooks).

The configs are the repository's conf/ folder, installed as the package `gpudl.conf` (package
data), so a checkout, an editable install and a regular `pip install .` find the same files: the
command-line entry points search `pkg://gpudl.conf`, and `compose` reads `config_dir()`.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, open_dict


def repo_root() -> Path:
    """The checkout holding conf/, scripts/ and tests/ (meaningful for a checkout or an editable
    install; an installed wheel has no scripts/)."""
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """The folder of train.yaml and its groups: $GPUDL_CONFIG_DIR, else the installed `gpudl.conf`."""
    if os.environ.get("GPUDL_CONFIG_DIR"):
        path = Path(os.environ["GPUDL_CONFIG_DIR"])
    else:
        from importlib.resources import files

        path = Path(str(files("gpudl.conf")))
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(
            f"gpudl: no train.yaml in the config folder {path}; set GPUDL_CONFIG_DIR to the conf/ folder"
        )
    return path


def compose(overrides: list[str] | None = None, config_name: str = "train",
            output_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose conf/<config_name>.yaml with command-line style overrides, as `gpudl-train` (or
    `scripts/train.py`) would, and make it usable by `gpudl.train.train` outside `@hydra.main`:

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
