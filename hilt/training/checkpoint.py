"""Checkpoints: a folder written atomically; ``load`` rebuilds the model through the model registry.

Layout of a checkpoint folder (``FORMAT_VERSION`` 1)::

    model.safetensors   the weights; a tied weight is stored once (aliases listed in the metadata)
    optimizer.pt        {"optimizer", "scheduler", "scaler"} state dicts (torch.save), absent for weights-only
    state.json          format version, model type, config, step, RNG states (python, numpy, torch, cuda),
                        data sampler state, training config, metrics
    config.json         the model config (``ModelConfig.to_json``), for people and other tools

Atomic save: everything is written into a temp folder next to the target and fsynced; only then the
previous checkpoint (if any) is moved aside, the temp folder renamed to the target name, and the old
one deleted. A failure at any point before the rename leaves the previous checkpoint untouched and
removes the temp folder; a checkpoint under the final name is always complete.

``hilt.load(path, device=...)`` rebuilds the model from ``state.json`` and the weights.
A corrupt, partial or mismatched checkpoint raises :class:`CheckpointError` naming the file and the problem.

Model types come from :mod:`hilt.models.registry` (``register_model``, ``get_model_spec``, ``build_model``,
re-exported here); this module imports the registry, never the other way round.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from hilt.models.registry import ModelSpec, build_model, get_model_spec, model_types, register_model, same_model_type

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "ModelSpec", "register_model", "get_model_spec", "model_types",
    "build_model", "save_checkpoint", "load_checkpoint", "load", "read_state", "unwrap_model",
    "rng_state", "set_rng_state", "tied_aliases",
]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ------------------------------------------------------------------------------------------ RNG state

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    """The RNG states of python, numpy, torch (CPU) and every CUDA device, JSON-serialisable."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------- tied weights

def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for state_dict entries that share storage with an earlier entry
    (e.g. ``lm_head.weight`` -> ``tok_emb.weight``)."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the same Parameter as its target again (if loading broke the tie)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params and params[alias] is not params[target]:
            mod_path, _, attr = alias.rpartition(".")
            mod = model.get_submodule(mod_path) if mod_path else model
            setattr(mod, attr, params[target])


# ---------------------------------------------------------------------------------------------- save

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def _write_weights(model: nn.Module, path: Path) -> dict[str, str]:
    from safetensors.torch import save_file

    aliases = tied_aliases(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}
    save_file(sd, str(path), metadata={"format": "pt", "hilt_format_version": str(FORMAT_VERSION),
                                       "tied": json.dumps(aliases)})
    return aliases


def _write_optimizer(path: Path, optimizer=None, scheduler=None, scaler=None) -> None:
    torch.save({
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }, path)


def save_checkpoint(path: Union[str, os.PathLike], model: nn.Module, *, optimizer=None, scheduler=None,
                    scaler=None, step: int = 0, sampler_state: Optional[dict] = None,
                    train_config: Optional[dict] = None, metrics: Optional[dict] = None,
                    extra: Optional[dict] = None, save_rng: bool = True) -> Path:
    """Write a checkpoint folder at ``path`` atomically (see the module docstring). Returns ``path``."""
    path = Path(path)
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no .config with to_dict(): cannot checkpoint it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        aliases = _write_weights(model, tmp / WEIGHTS)
        if optimizer is not None or scheduler is not None or scaler is not None:
            _write_optimizer(tmp / OPTIMIZER, optimizer, scheduler, scaler)
        from hilt_kernels import __version__

        state = {
            "format_version": FORMAT_VERSION,
            "hilt_version": __version__,
            "torch_version": torch.__version__,
            "model_type": config.model_type,
            "config": config.to_dict(),
            "tied": aliases,
            "step": int(step),
            "rng": rng_state() if save_rng else None,
            "sampler": sampler_state,
            "train_config": train_config,
            "metrics": metrics or {},
            "has_optimizer": (tmp / OPTIMIZER).exists(),
        }
        if extra:
            state.update(extra)
        _write_json(tmp / STATE, state)
        config.to_json(tmp / CONFIG)
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        # The new checkpoint is complete: swap it in.
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous one back
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- load

def _resolve(path: Union[str, os.PathLike]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        # interrupted between "move the old one aside" and "rename the new one in"
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = f" (a previous checkpoint was left at {olds[-1]}; rename it to {path.name} to use it)" if olds else ""
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    if path.is_file():
        if path.name in (WEIGHTS, STATE, CONFIG, OPTIMIZER):
            return path.parent
        raise CheckpointError(f"{path}: a checkpoint is a folder (with {STATE} and {WEIGHTS}), not a file")
    return path


def read_state(path: Union[str, os.PathLike]) -> dict:
    """``state.json`` of a checkpoint, validated (format version, model type, config)."""
    path = _resolve(path)
    f = path / STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (not a hilt checkpoint, or a partial one)")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: expected a JSON object, got {type(state).__name__}")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{f}: unknown checkpoint format_version {version!r} (this hilt reads "
                              f"version {FORMAT_VERSION})")
    for key in ("model_type", "config", "step"):
        if key not in state:
            raise CheckpointError(f"{f}: missing key {key!r}")
    try:
        spec = get_model_spec(state["model_type"])
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None
    cfg = state["config"]
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: 'config' must be a JSON object")
    cfg_type = cfg.get("model_type", spec.config_class.model_type)
    if not same_model_type(cfg_type, spec.model_type):
        raise CheckpointError(f"{f}: config model_type {cfg_type!r} does not match model_type "
                              f"{state['model_type']!r}")
    return state


def _make_config(state: dict, path: Path):
    spec = get_model_spec(state["model_type"])
    try:
        return spec, spec.config_class.from_dict(dict(state["config"], model_type=spec.config_class.model_type))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / STATE}: invalid {spec.config_class.__name__}: {e}") from None


def _load_weights(model: nn.Module, path: Path, strict_type: Optional[str] = None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (partial checkpoint?)")
    try:
        sd = load_file(str(f))
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: cannot read the weights ({e})") from None
    aliases = json.loads(meta.get("tied", "{}"))
    for alias, target in aliases.items():
        if target in sd:
            sd[alias] = sd[target]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{f}: does not match the {type(model).__name__} built from state.json: "
                              + "; ".join(parts))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{f}: shape mismatch for {k!r}: checkpoint {tuple(v.shape)}, model "
                                  f"{tuple(expected[k].shape)}")
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    _retie(model, aliases)


def load(path: Union[str, os.PathLike], device: Union[str, torch.device, None] = "cpu", *,
         model_type: Optional[str] = None, backend: Optional[str] = None, eval_mode: bool = True) -> nn.Module:
    """The model saved in a checkpoint folder, on ``device``, in eval mode.

    ``model_type``: when given, the checkpoint must hold that type (else :class:`CheckpointError`).
    """
    path = _resolve(path)
    state = read_state(path)
    if model_type is not None and get_model_spec(model_type).model_type != get_model_spec(state["model_type"]).model_type:
        raise CheckpointError(f"{path / STATE}: holds a {state['model_type']!r} model, expected {model_type!r}")
    spec, config = _make_config(state, path)
    kwargs = {"backend": backend} if backend is not None else {}
    model = spec.model_class(config, **kwargs)
    _load_weights(model, path)
    if device is not None:
        model.to(device)
    if eval_mode:
        model.eval()
    return model


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module, *, optimizer=None, scheduler=None,
                    scaler=None, map_location="cpu", restore_rng: bool = True) -> dict:
    """Restore a training run in place: weights into ``model`` (its type and config must match), optimizer,
    scheduler and scaler states, and (``restore_rng``) the RNG states. Returns ``state.json``'s dict."""
    path = _resolve(path)
    state = read_state(path)
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and get_model_spec(state["model_type"]).model_type != cfg.model_type:
        raise CheckpointError(f"{path / STATE}: holds a {state['model_type']!r} model, but the model to "
                              f"restore is {cfg.model_type!r}")
    _load_weights(model, path)
    if optimizer is not None or scheduler is not None or scaler is not None:
        f = path / OPTIMIZER
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint holds no optimizer state; it cannot be resumed)")
        try:
            opt = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error means a corrupt file
            raise CheckpointError(f"{f}: cannot read the optimizer state ({type(e).__name__}: {e})") from None
        try:
            if optimizer is not None:
                optimizer.load_state_dict(opt["optimizer"])
            if scheduler is not None and opt.get("scheduler") is not None:
                scheduler.load_state_dict(opt["scheduler"])
            if scaler is not None and scaler.is_enabled() and opt.get("scaler") is not None:
                scaler.load_state_dict(opt["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{f}: does not match this optimizer ({type(e).__name__}: {e})") from None
    if restore_rng and state.get("rng"):
        try:
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path / STATE}: bad RNG state ({e})") from None
    return state
