"""Train one experiment (or sweep many) from the Hydra configs in conf/: `gpudl-train` in a checkout.

    python scripts/train.py                                   # experiment=cnn_digits
    python scripts/train.py experiment=linreg_toy optimizer=gd logger=csv
    python scripts/train.py -m model.optimizer.lr=1e-3,1e-2 seed=1,2
    python scripts/train.py debug=fdr                         # one batch of everything
    python scripts/train.py hparams_search=cnn_digits_optuna  # Bayesian search (Optuna)
    python scripts/train.py hydra.run.dir=<run dir> ckpt_path=last   # continue an interrupted run

Outputs: logs/<task_name>/runs/<timestamp>/ (multirun: logs/<task_name>/multiruns/<timestamp>/<job>/)
in this checkout, whatever the working directory. See gpudl.cli.
"""

import os
from pathlib import Path

# Anchor logs/ at the checkout whatever the working directory (paths.root_dir reads it).
os.environ.setdefault("GPUDL_ROOT", str(Path(__file__).resolve().parents[1]))

from gpudl.cli import train_main  # noqa: E402

if __name__ == "__main__":
    train_main()
