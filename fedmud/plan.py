"""Which tensors of a model carry a decomposed update, and how large each update is.

The planner sees only names and shapes (it works on any ``nn.Module``), and decides
for every floating tensor of the model's ``state_dict``:

- **frozen** — never parameterised, never uploaded, bitwise the same after every merge — when
  it is a parameter with ``requires_grad=False`` (a PEFT model's base weights, HF's fixed
  sinusoidal positions): the model's owner froze it, so no party trains it;
- **dense** — it uploads its values each round — when it is
  1-D or a buffer (biases, norms, BatchNorm running statistics), named in
  ``dense-layers``, or too small for any decomposed update to be smaller than the
  tensor itself; a 1-D tensor or buffer (a *vector*) travels at 8 bits where
  ``vector-uplink`` says so (below);
- **decomposed** otherwise: any floating parameter of two or more dimensions
  (Linear, Conv1d/2d/3d, grouped and transposed convolutions, Embedding, attention
  ``in_proj_weight``, RNN ``weight_ih``/``weight_hh``, a bare ``nn.Parameter``).

A tensor registered under several names (tied weights, ``out.weight = embed.weight``)
is one tensor: planned, trained, uploaded and counted once, under its first name
(:func:`unique_state`); the others are its aliases.

``dense-layers = "auto"`` (the default) is the paper's choice, the first and last
layers dense, *when they fit*: each is kept dense only if the smallest updates of
all the others still fit the ratio beside it. The remaining budget is shared by the
decomposed tensors with one upload share for all (:func:`~fedmud.decomposition.allocate_sizes`).
No tensor stays dense against the ratio in silence: the plan says why each one is
dense, and a target that cannot be reached is refused with the smallest ratio that
can, and the tensors that use most of it.

The ratio is of bytes: dense FedAvg's float32 upload against this plan's upload as the
default float32 uplink codes it (a lossy ``uplink`` sends fewer). Factors and dense layers
cost 4 bytes a value; a vector 4, or at int8 (``vector-uplink``) 1 byte a value and a
float32 scale per :data:`~fedmud.codec.INT8_CHUNK` values of it, its residual against the
round-start values as the lossy codes send theirs. ``vector-uplink=auto`` (the default)
codes vectors at int8 only when the ratio cannot be reached with them at float32: models
whose norms and biases alone exceed the ratio (ShuffleNet-V2 2.5% of its values, MobileViT-v2
2.2%) then plan at 1/32, and every model that planned before plans as it did, bitwise.

Which of these a run uses is its method's choice (:mod:`fedmud.methods`): each method's
``plan`` calls :func:`dense_plan`, :func:`plan_to_ratio` with its own :class:`~fedmud.decomposition.Sizing`,
or plans in its own way from the same pieces (LoRA's adapters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from typing import TYPE_CHECKING

from .codec import INT8_CHUNK
from .decomposition import Sizing, allocate_sizes
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import DecompositionConfig

AUTO, FIRST, LAST = "auto", "first", "last"
FLOAT32, INT8 = "float32", "int8"  # how a planned tensor's values travel (at the float32 uplink)
VECTOR_REASONS = ("1-D", "buffer")  # why a vector is dense: what ``vector-uplink`` may code at int8
FLOAT32_BYTES = 4
VECTOR_LABEL = "1-D tensors and buffers (biases, norms, running statistics)"  # in a refusal


def coded_nbytes(code: str, numel: int) -> int:
    """Bytes ``numel`` values of one tensor cost as ``code`` sends them (int8: a float32 scale a chunk)."""
    if code == INT8:
        return numel + FLOAT32_BYTES * math.ceil(numel / INT8_CHUNK)
    return FLOAT32_BYTES * numel


@dataclass(frozen=True)
class TensorPlan:
    """One floating tensor of the model: decomposed with ``sizes``, or dense for ``reason``."""

    name: str
    shape: tuple[int, ...]
    upload: int  # values uploaded per round
    sizes: tuple[int, ...] | None = None  # rank (mat) or Kronecker factor sizes (kron); None: dense
    reason: str = ""  # why the tensor is dense (or frozen)
    how: str = ""  # what its parametrisation is, in words (decomposed)
    frozen: bool = False  # requires_grad=False: not trained, not uploaded (upload 0)
    code: str = FLOAT32  # how its values travel at the float32 uplink: float32, or int8 (a vector)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes uploaded per round at the float32 uplink."""
        return coded_nbytes(self.code, self.upload)

    @property
    def decomposed(self) -> bool:
        return self.sizes is not None


@dataclass(frozen=True)
class DecompositionPlan:
    """Every floating tensor's decision, in ``state_dict`` order, and the totals."""

    tensors: tuple[TensorPlan, ...]
    method: str
    ratio: float | None  # the upload target; None: the method has none (fedavg, the LoRA methods)

    @property
    def dense_reference(self) -> int:
        """Values dense FedAvg of the whole model uploads (full fine-tuning): every floating tensor."""
        return sum(t.numel for t in self.tensors)

    @property
    def trained_reference(self) -> int:
        """Values dense FedAvg of the same trained tensors uploads: every floating tensor not frozen."""
        return sum(t.numel for t in self.tensors if not t.frozen)

    @property
    def upload(self) -> int:
        """Values uploaded per round."""
        return sum(t.upload for t in self.tensors)

    @property
    def upload_bytes(self) -> int:
        """Bytes uploaded per round at the float32 uplink: what ``ratio`` bounds."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def dense_reference_bytes(self) -> int:
        """Bytes dense FedAvg of the whole model uploads in float32."""
        return FLOAT32_BYTES * self.dense_reference

    @property
    def trained_reference_bytes(self) -> int:
        """Bytes dense FedAvg of the trained tensors uploads in float32."""
        return FLOAT32_BYTES * self.trained_reference

    def decomposed(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors if t.decomposed}

    def int8_names(self) -> frozenset[str]:
        """The tensors that travel at int8 when the uplink codes at more bits (``vector-uplink``)."""
        return frozenset(t.name for t in self.tensors if t.code == INT8)

    def lines(self) -> list[str]:
        """One line per tensor (how it is decomposed, or why it stays dense), then the total."""
        out = []
        for t in self.tensors:
            if t.decomposed:
                out.append(f"{t.name} {t.shape}: {t.how} uploads {t.upload}/{t.numel}")
            elif t.frozen:
                out.append(f"{t.name} {t.shape}: {t.reason}, uploads 0")
            elif t.code == INT8:
                out.append(f"{t.name} {t.shape}: dense ({t.reason}) uploads {t.numel} at int8, {t.nbytes} bytes")
            else:
                out.append(f"{t.name} {t.shape}: dense ({t.reason}) uploads {t.numel}")
        if not self.int8_names():  # every value 4 bytes: values and bytes give one ratio
            up, ref, trained, unit = self.upload, self.dense_reference, self.trained_reference, "values"
            total = f"upload {up} values vs dense {ref}" if up else f"upload 0 of {ref}"
        else:
            up, ref, trained = self.upload_bytes, self.dense_reference_bytes, self.trained_reference_bytes
            unit = "float32 bytes"
            total = f"upload {self.upload} values in {up} bytes vs dense {ref} bytes (float32)"
        if up:
            total += f": ratio {up / ref:.5f} (1/{ref / up:.1f})"
        if trained != ref and up:
            total += f"; vs the {trained} trained {unit}: ratio {up / trained:.5f} (1/{trained / up:.1f})"
        out.append(total)
        return out


def weight_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Trained floating parameters with two or more dimensions, by state_dict name: what can be decomposed."""
    return {
        name: tuple(p.shape)
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.dim() >= 2 and p.requires_grad
    }


def frozen_tensors(model: nn.Module) -> set[str]:
    """Floating parameters with ``requires_grad=False`` (their first name, if tied): the owner froze them."""
    return {
        name
        for name, t in unique_state(model, keep_vars=True).items()
        if isinstance(t, nn.Parameter) and t.is_floating_point() and not t.requires_grad
    }


def unique_state(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tensor once, under its first name: tied weights are one tensor."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor if keep_vars else tensor.detach()
    return out


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """First name -> every name of a parameter registered under several (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {group[0]: group for group in names.values() if len(group) > 1}


def _first_and_last(candidates: list[str]) -> tuple[str, str]:
    """The model's first and last layers: its first and last ``*.weight`` tensors (else any)."""
    weights = [n for n in candidates if n.endswith(".weight")] or candidates
    return weights[0], weights[-1]


def resolve_dense(requested: tuple[str, ...], candidates: list[str]) -> tuple[dict[str, str], list[str]]:
    """(tensor -> why it is dense by request, tensors preferred dense when they fit)."""
    forced: dict[str, str] = {}
    preferred: list[str] = []
    first, last = _first_and_last(candidates) if candidates else ("", "")
    for item in requested:
        if item == AUTO:
            preferred += [n for n in (first, last) if n and n not in preferred]
        elif item in (FIRST, LAST):
            if candidates:
                forced[first if item == FIRST else last] = f"dense-layers: {item}"
        elif item in candidates:
            forced[item] = "dense-layers"
        else:  # a module name: every weight tensor under it
            under = [n for n in candidates if n.startswith(item + ".")]
            if not under:
                shown = ", ".join(candidates[:40]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 40 else "")
                raise ConfigError(
                    f"dense-layers contains {item!r}, which is neither a weight tensor nor a module holding one; "
                    f"allowed: auto, first, last, a module name, or a tensor name: {shown}"
                )
            forced.update({n: f"dense-layers: {item}" for n in under})
    return forced, [n for n in preferred if n not in forced]


def floating_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every floating tensor of the state (tied ones once) but the frozen, by name: what a method plans."""
    frozen = frozen_tensors(model)
    return {n: tuple(t.shape) for n, t in unique_state(model).items() if torch.is_floating_point(t) and n not in frozen}


def with_frozen(plan: DecompositionPlan, model: nn.Module) -> DecompositionPlan:
    """``plan`` (a method's, of :func:`floating_shapes`) with the frozen tensors in their state order."""
    frozen = frozen_tensors(model)
    if not frozen:
        return plan
    planned = {t.name: t for t in plan.tensors}
    tensors = []
    for name, t in unique_state(model).items():
        if name in frozen:
            reason = "frozen (requires_grad=False): never trained nor uploaded"
            tensors.append(TensorPlan(name, tuple(t.shape), 0, reason=reason, frozen=True))
        elif name in planned:
            tensors.append(planned[name])
    return DecompositionPlan(tuple(tensors), plan.method, plan.ratio)


def dense_plan(model: nn.Module, method: str) -> DecompositionPlan:
    """Every floating tensor dense: what dense FedAvg uploads."""
    tensors = tuple(TensorPlan(n, s, math.prod(s), reason=f"method={method}") for n, s in floating_shapes(model).items())
    return DecompositionPlan(tensors, method, None)


def plan_to_ratio(model: nn.Module, config: DecompositionConfig, sizing: Sizing) -> DecompositionPlan:
    """Every weight tensor not kept dense parameterised as ``sizing`` builds, sized so that
    everything uploaded meets ``config.ratio`` of the trained tensors' float32 bytes (one upload
    share for all: :func:`allocate_sizes`), the vectors at int8 where ``config.vector_uplink``
    says so; frozen tensors are no part of the target.

    Raises :class:`ConfigError` when the ratio cannot be reached, with the smallest that can.
    """
    floating = floating_shapes(model)
    weights = weight_tensors(model)
    candidates = [n for n in floating if n in weights]
    dense, preferred = resolve_dense(config.dense_layers, candidates)
    for name in candidates:
        if name in dense:
            continue
        if sizing.smallest(weights[name]) >= math.prod(weights[name]):
            dense[name] = f"too small: the smallest update uploads {sizing.smallest(weights[name])}"
    for name, shape in floating.items():
        if name not in weights:
            dense[name] = VECTOR_REASONS[0] if len(shape) < 2 else VECTOR_REASONS[1]
    target = math.floor(config.ratio * FLOAT32_BYTES * sum(math.prod(s) for s in floating.values()))
    vectors = INT8 if config.vector_uplink == INT8 else FLOAT32

    def cost(name: str, dense_names) -> int:
        """Bytes ``name`` uploads: dense (a vector as ``vectors`` codes it), or its smallest update."""
        numel = math.prod(floating[name])
        if name not in dense_names:
            return FLOAT32_BYTES * sizing.smallest(floating[name])
        return coded_nbytes(vectors if dense.get(name) in VECTOR_REASONS else FLOAT32, numel)

    def need(dense_names) -> int:
        """The smallest upload in bytes with ``dense_names`` dense and every other candidate at its smallest."""
        return sum(cost(n, dense_names) for n in floating)

    if need(dense) > target and config.vector_uplink == AUTO:  # only what the ratio needs moves to 8 bits
        vectors = INT8
    if need(dense) > target:
        frozen = frozen_tensors(model)
        frozen_values = sum(t.numel() for n, t in unique_state(model).items() if n in frozen)
        raise _unreachable(config, floating, dense, sizing, vectors, need(dense), frozen_values)
    for name in preferred:  # the paper's first/last layers, dense only when the rest still fits
        if name not in dense and need({**dense, name: ""}) <= target:
            dense[name] = "first/last layer, fits the ratio"
    rest = {n: weights[n] for n in candidates if n not in dense}
    budget = (target - sum(cost(n, dense) for n in dense)) // FLOAT32_BYTES  # values of float32 factors
    sizes = allocate_sizes(sizing, rest, budget) if rest else {}
    tensors = []
    for name, shape in floating.items():
        if name in sizes:
            chosen = sizes[name]
            upload = sizing.upload(shape, chosen)
            tensors.append(TensorPlan(name, shape, upload, chosen, how=sizing.describe(shape, chosen)))
        else:
            code = vectors if dense[name] in VECTOR_REASONS else FLOAT32
            tensors.append(TensorPlan(name, shape, math.prod(shape), reason=dense[name], code=code))
    return DecompositionPlan(tuple(tensors), config.method, config.ratio)


def _unreachable(
    config: DecompositionConfig,
    floating: Mapping[str, tuple[int, ...]],
    dense: Mapping[str, str],
    sizing: Sizing,
    vectors: str,
    need: int,
    frozen: int = 0,
) -> ConfigError:
    """The error for a ratio the model cannot reach: the smallest ratio, and what uses it (of the
    values that train: ``frozen`` values are no part of the target). ``need`` is in bytes; with
    every value at float32 the message counts values (4 bytes each), else bytes."""
    per = 1 if vectors == INT8 else FLOAT32_BYTES  # bytes a listed unit
    total = sum(math.prod(s) for s in floating.values())
    vector_label = VECTOR_LABEL + (" at int8" if vectors == INT8 else "")
    uses: dict[str, int] = {}  # what uses the bytes
    for name, shape in floating.items():
        if name not in dense:
            uses[f"{name} (smallest {sizing.label} update)"] = FLOAT32_BYTES * sizing.smallest(shape)
        elif dense[name] in VECTOR_REASONS:
            uses[vector_label] = uses.get(vector_label, 0) + coded_nbytes(vectors, math.prod(shape))
        else:
            uses[f"{name} (dense: {dense[name]})"] = math.prod(shape) * FLOAT32_BYTES
    top = sorted(uses.items(), key=lambda kv: -kv[1])[:5]
    floor = need / (FLOAT32_BYTES * total)
    listed = "; ".join(f"{what} {n // per}" for what, n in top)
    values = f"{total} trained values (its {frozen} frozen ones upload nothing)" if frozen else f"{total} values"
    if vectors == INT8:
        at_least = (
            f"at least {need} bytes (vectors at int8, vector-uplink={config.vector_uplink}) of the "
            f"{FLOAT32_BYTES * total} float32 bytes of the model's {values}"
        )
    else:
        at_least = f"at least {need // FLOAT32_BYTES} of the model's {values}"
    hint = "" if vectors == INT8 or VECTOR_LABEL not in uses else ", or send the vectors at int8 (vector-uplink=int8)"
    return ConfigError(
        f"ratio={config.ratio:.6g} (1/{1 / config.ratio:.1f}) cannot be reached with "
        f"dense-layers={','.join(config.dense_layers)}: {at_least} must "
        f"upload, so allowed: ratio >= {floor:.4g} (1/{1 / floor:.1f}). Most of it: {listed}. "
        f"Raise ratio or keep fewer tensors dense{hint}"
    )
