"""Error feedback for lossy uploads, in weight space for decomposed layers.

A lossy codec sends ``Q(target)`` instead of ``target``; error feedback keeps what
was lost and adds it to the next upload. For dense tensors (dense layers,
BatchNorm, FedLMT factors, all of FedAvg) the error lives in the upload's own
coordinates. A decomposed layer's trained factors mean something else every round
(the frozen anchors are redrawn), so its error is kept as a *weight update* ``E``:

- before encoding, ``E`` is written in this round's trained factors by least
  squares (:func:`~fedmud.projection.project_to_trained`) and added to the upload;
- after encoding, ``E <- E - ΔW(projection) + ΔW(target - sent)``: what the
  subspace could not hold stays, and the codec's loss joins it.

Nothing is lost, only delayed: ``Σ sent + E`` equals ``Σ residual`` in weight space
(see ``tests/test_codec.py``). Needs ΔW linear in the trained factors (``aad``, ``fab``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .codec import Codec
from .mud import DecomposedModel
from .projection import linear_delta, project_to_trained


class ErrorFeedback:
    """One client's carried error; ``state()``/``load_state()`` keep it across rounds."""

    def __init__(self, model: DecomposedModel, codec: Codec) -> None:
        self.model = model
        self.codec = codec
        offsets, offset = {}, 0
        for name, shape in codec.layout.entries:
            size = math.prod(shape)
            offsets[name] = slice(offset, offset + size)
            offset += size
        self.slices = {
            lname: {f.name: offsets[f"{lname}.{f.name}"] for f in layer.update.factors if f.trainable}
            for lname, layer in model.updates().items()
        }
        self.dense_mask = np.ones(codec.layout.numel, dtype=bool)
        for factors in self.slices.values():
            for sl in factors.values():
                self.dense_mask[sl] = False
        self.reset()

    def reset(self) -> None:
        self.dense_error = np.zeros(self.codec.layout.numel, dtype=np.float32)
        self.weight_error = {
            name: torch.zeros(layer.update.weight_shape) for name, layer in self.model.updates().items()
        }
        self._projected: dict[str, dict[str, torch.Tensor]] = {}

    def state(self) -> dict[str, torch.Tensor]:
        return {"dense": torch.from_numpy(self.dense_error.copy()), **{f"weight/{n}": e.clone() for n, e in self.weight_error.items()}}

    def load_state(self, state: Mapping[str, torch.Tensor] | None) -> None:
        self.reset()
        if not state:
            return
        self.dense_error = state["dense"].numpy().astype(np.float32).copy()
        for name in self.weight_error:
            self.weight_error[name] = state[f"weight/{name}"].detach().cpu().float().clone()

    def _layer_anchors(self, name: str) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.model.updates()[name].anchors().items()}

    def compensate(self, residual: np.ndarray) -> np.ndarray:
        """``residual`` plus the carried error, written in this round's coordinates."""
        target = residual.astype(np.float32) + np.where(self.dense_mask, self.dense_error, 0.0).astype(np.float32)
        self._projected = {}
        for name, layer in self.model.updates().items():
            projected = project_to_trained(layer.update, self._layer_anchors(name), self.weight_error[name])
            self._projected[name] = projected
            for factor, sl in self.slices[name].items():
                target[sl] += projected[factor].reshape(-1).numpy()
        return target

    def update(self, target: np.ndarray, sent: np.ndarray) -> None:
        """Keep what ``sent`` (the decoded upload) lost of ``target`` (from :meth:`compensate`)."""
        diff = (target - sent).astype(np.float32)
        self.dense_error = np.where(self.dense_mask, diff, 0.0).astype(np.float32)
        for name, layer in self.model.updates().items():
            anchors = self._layer_anchors(name)
            lost = {f: torch.from_numpy(diff[sl].copy()).reshape(layer.factor(f).shape) for f, sl in self.slices[name].items()}
            with torch.no_grad():
                self.weight_error[name] = (
                    self.weight_error[name]
                    - linear_delta(layer.update, anchors, self._projected[name])
                    + linear_delta(layer.update, anchors, lost)
                )
