"""What a training checkpoint holds, and writing and reading it.

A checkpoint folder (written after every validation) holds ``model.pt`` (weights + full model config, the project's
checkpoint format: :func:`edsr_ray.weights.load_model` reads the folder directly), :data:`TRAIN_STATE` (optimizer,
scheduler, step and RNG states: all plain tensors and types, loadable with ``weights_only``) and :data:`META` (step,
metrics and the MLflow run, as JSON).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edsr_ray.training.update import UpdateStep
from edsr_ray.weights import save_model

TRAIN_STATE = "train_state.pt"
META = "meta.json"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states a checkpoint saved (torch, Python, NumPy and CUDA where there is one)."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    directory: Path, model: torch.nn.Module, update: UpdateStep, step: int, meta: dict[str, Any]
) -> None:
    """Write a complete training checkpoint into ``directory`` (plain tensors and types: loads with weights_only)."""
    save_model(model, directory / "model.pt")
    torch.save(
        {
            **update.state_dict(),
            "step": step,
            "rng": _rng_state(),
        },
        directory / TRAIN_STATE,
    )
    (directory / META).write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))


def load_train_state(directory: Path, device: torch.device) -> dict[str, Any]:
    """The optimizer, scheduler, step and RNG states of a checkpoint folder."""
    return torch.load(directory / TRAIN_STATE, map_location=device, weights_only=True)
