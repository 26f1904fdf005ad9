"""From a composed config to objects, with every mistake that can be seen before training named.

    validate_config(cfg)           no '???' left, every interpolation resolves, every `_target_`
                                   imports (close names suggested), positive learning rates and
                                   batch size, a string optimized_metric
    set_kernel_backend(cfg)        kernels.backend for this process (an unknown name is an error)
    set_cpu_threads(cfg)           cpu_threads: PyTorch's intra-op CPU threads for this process
    check_kernel_device(cfg, dev)  kernels.backend=triton on a CPU needs TRITON_INTERPRET=1
    check_model_fits_data(cfg, dm) the model's sizes against what the data module holds
    instantiate(node, key)         hydra's instantiate, its errors naming the config keys involved
    instantiate_group(node, key)   every entry of a group (callbacks, logger) that has a `_target_`

Each raises ConfigError: one line naming the key, what it got and what was expected.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration cannot run; the message names the key and what was expected."""


def mixed_precision() -> str:
    """The mixed precision this machine trains in: bf16-mixed, or 16-mixed on a GPU without
    bfloat16 (before Ampere). `${gpudl.mixed_precision:}` in a config (trainer=gpu's default)."""
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "16-mixed"
    return "bf16-mixed"


OmegaConf.register_new_resolver("gpudl.mixed_precision", mixed_precision, replace=True)


# --------------------------------------------------------------------------- checks before building
def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (dotted key, parent node, key) for every entry below `node`, without resolving."""
    if isinstance(node, DictConfig):
        items = [(k, k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(i, str(i)) for i in range(len(node))]
    else:
        return
    for key, name in items:
        dotted = f"{prefix}.{name}" if prefix else str(name)
        yield dotted, node, key
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            yield from _walk(child, dotted)


def _locate(target: str) -> Any:
    """Import a dotted path ('pkg.module.Class'); raise ImportError saying which part is missing
    (with close names when one is misspelled)."""
    import difflib
    import importlib

    parts = target.split(".")
    if not all(parts):
        raise ImportError("expected a dotted path such as 'gpudl.models.CNNModule'")
    obj, found = None, 0
    for i in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj, found = importlib.import_module(".".join(parts[:i])), i
            break
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # a module that exists but fails inside on a missing dependency
    if obj is None:
        raise ImportError(f"no module named {parts[0]!r}")
    for i in range(found, len(parts)):
        if not hasattr(obj, parts[i]):
            close = difflib.get_close_matches(parts[i], [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(repr('.'.join(parts[:i] + [c])) for c in close)}?" if close else ""
            raise ImportError(f"{'.'.join(parts[:i])!r} has no attribute {parts[i]!r}{hint}")
        obj = getattr(obj, parts[i])
    return obj


def validate_config(cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer")) -> None:
    """Raise ConfigError for mistakes visible before anything is built."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra.")]
    if missing:
        raise ConfigError(
            "missing required value(s): "
            + ", ".join(sorted(missing))
            + " (marked '???' in the config; set them on the command line, e.g. "
            + f"`{sorted(missing)[0]}=...`)"
        )
    try:  # every interpolation must resolve (e.g. ${optimizer_lr.adam})
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"cannot resolve config key {key!r}: {err}") from None

    for key in required:
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            got = None if node is None else OmegaConf.to_yaml(node).strip() if isinstance(node, DictConfig) else node
            raise ConfigError(f"`{key}` must be a config with a `_target_` (got {got!r}); pick one, e.g. {key}=<name>")

    for dotted, parent, key in _walk(cfg):
        if dotted.startswith("hydra."):
            continue
        value = parent[key]
        if key == "_target_":
            if not isinstance(value, str):
                raise ConfigError(f"{dotted}: expected a dotted import path, got {value!r}")
            try:
                _locate(value)
            except Exception as err:  # ImportError, AttributeError, ...
                raise ConfigError(f"{dotted}: unknown target {value!r}: {err}") from None
        elif key == "lr" and dotted.startswith("model."):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{dotted} must be a positive number (the learning rate), got {value!r}")

    batch_size = cfg.data.get("batch_size", None) if "data" in cfg else None
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"data.batch_size must be a positive int, or null for full batch, got {batch_size!r}")
    metric = cfg.get("optimized_metric")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"optimized_metric must be a metric name such as 'val/acc', got {metric!r}")


def set_kernel_backend(cfg: DictConfig) -> None:
    """Set `kernels.backend` as this process's backend (gpudl.backend.set_backend)."""
    from gpudl import backend

    name = OmegaConf.select(cfg, "kernels.backend")
    if name is None:
        return
    try:
        backend.set_backend(name)
    except ValueError as err:
        raise ConfigError(f"kernels.backend: {err}") from None


def set_cpu_threads(cfg: DictConfig) -> int:
    """Set PyTorch's intra-op CPU threads to `cpu_threads` (null: PyTorch's choice, OMP_NUM_THREADS
    or one per core) and log it; returns the number in use. OMP_NUM_THREADS is set to match, so
    processes the run starts (ddp_spawn workers, launchers) use the same number."""
    import os

    import torch

    value = cfg.get("cpu_threads")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"cpu_threads must be a positive integer or null (PyTorch's choice), got {value!r}")
        torch.set_num_threads(value)
        os.environ["OMP_NUM_THREADS"] = str(value)
    threads = torch.get_num_threads()
    log.info("CPU threads: %d (cpu_threads=%s; %d logical cores)", threads, value, os.cpu_count() or 0)
    return threads


def check_kernel_device(cfg: DictConfig, device_type: str) -> None:
    """kernels.backend=triton forces the Triton kernels, which need CUDA tensors, or on the CPU the
    Triton interpreter (TRITON_INTERPRET=1 before gpudl.kernels is imported). Say so now rather
    than at the first op of the first training step."""
    if OmegaConf.select(cfg, "kernels.backend") != "triton" or device_type == "cuda":
        return
    try:
        from gpudl.kernels import registry
    except ImportError as err:
        raise ConfigError(f"kernels.backend=triton: the Triton kernels cannot be imported ({err}); "
                          "use kernels.backend=auto or torch") from None
    if not registry.INTERPRET:
        raise ConfigError(
            f"kernels.backend=triton runs the Triton kernels, which need a CUDA device, and this run is on the "
            f"{device_type}: use kernels.backend=auto (PyTorch on the CPU) or torch, or set TRITON_INTERPRET=1 to run "
            "the kernels on the CPU through the Triton interpreter (slow: for testing them)"
        )


def check_model_fits_data(cfg: DictConfig, datamodule: Any) -> None:
    """The model's input/output sizes are config values; compare them with what the data holds
    (e.g. after data.path=<your file> with other sizes) before the model is built."""
    model = cfg.model
    expected: dict[str, Any] = {}
    for attr in ("num_features", "num_classes", "vocab_size"):
        if hasattr(datamodule, attr):
            expected[attr] = getattr(datamodule, attr)
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None:
        shape = [int(s) for s in shape]
        expected.update(image_shape=shape, in_channels=shape[0], image_size=shape[-1])
        if "input_size" in model:  # the RNN reads one image row per step
            expected["input_size"] = shape[-1]
    for attr, value in expected.items():
        if attr not in model or model[attr] is None:
            continue
        got = model[attr]
        got = [int(v) for v in got] if isinstance(got, ListConfig) else got
        if got != value:
            hint = f"{attr}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{attr}={value}"
            raise ConfigError(
                f"model.{attr}={got} does not fit the data: {cfg.data._target_} provides {attr}={value}; "
                f"set model.{hint}"
            )


# --------------------------------------------------------------------------- building objects
def instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate(node, **kwargs); a constructor's error becomes a ConfigError naming
    `key` and the entries of `node` it mentions."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        text = str(cause)

        # Name the config keys the constructor complained about: by name (batch_size) or by
        # value (data.path=/nope.npz), so the user knows what to change.
        def mentioned(k: Any) -> bool:
            value = node[k]
            by_value = isinstance(value, str) and value != "" and value in text
            return by_value or re.search(rf"\b{re.escape(str(k))}\b", text) is not None

        involved = [
            f"{key}.{k}={node[k]!r}" if isinstance(node[k], str) else f"{key}.{k}"
            for k in node
            if not str(k).startswith("_") and mentioned(k)
        ]
        where = f" [check {', '.join(involved)}]" if involved else ""
        raise ConfigError(
            f"could not build `{key}` ({node.get('_target_')}){where}: {type(cause).__name__}: {cause}"
        ) from cause


def instantiate_group(node: DictConfig | None, key: str, extra: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Build every entry of callbacks/logger that has a `_target_` (entries left without one,
    e.g. an experiment's callbacks.model_checkpoint.monitor after callbacks=none, are skipped).
    `extra[name]` holds keyword arguments for entry `name` that override its config."""
    extra = extra or {}
    objects = []
    if node is None:
        return objects
    if not isinstance(node, DictConfig):
        raise ConfigError(f"`{key}` must be a mapping of name -> config with `_target_`, got {node!r}")
    for name, entry in node.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            objects.append(instantiate(entry, f"{key}.{name}", **extra.get(name, {})))
        elif entry is not None:
            log.info("%s.%s has no _target_; skipped", key, name)
    return objects
