"""Which tensors of a model carry a decomposed update, and how large each update is.

The planner sees only names and shapes (it works on any ``nn.Module``), and decides
for every floating tensor of the model's ``state_dict``:

- **dense** — it uploads its values each round — when it is
  1-D or a buffer (biases, norms, BatchNorm running statistics), named in
  ``dense-layers``, or too small for any decomposed update to be smaller than the
  tensor itself;
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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import LORA_METHODS, ConfigError, DecompositionConfig
from .decomposition import allocate_sizes, build_update, matrix_shape, smallest_cost

AUTO, FIRST, LAST = "auto", "first", "last"
# methods that parameterise the weights themselves: the (kind, pattern) each is sized as
FACTORISED = {"fedlmt": ("mat", "ab"), "fedpara": ("hadamard", "ab")}


@dataclass(frozen=True)
class TensorPlan:
    """One floating tensor of the model: decomposed with ``sizes``, or dense for ``reason``."""

    name: str
    shape: tuple[int, ...]
    upload: int  # values uploaded per round
    sizes: tuple[int, ...] | None = None  # rank (mat) or Kronecker factor sizes (kron); None: dense
    reason: str = ""  # why the tensor is dense

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def decomposed(self) -> bool:
        return self.sizes is not None


@dataclass(frozen=True)
class DecompositionPlan:
    """Every floating tensor's decision, in ``state_dict`` order, and the totals."""

    tensors: tuple[TensorPlan, ...]
    kind: str
    pattern: str
    ratio: float | None  # None: fedavg (no target)

    @property
    def dense_reference(self) -> int:
        """Values dense FedAvg uploads: every floating tensor of the state_dict."""
        return sum(t.numel for t in self.tensors)

    @property
    def upload(self) -> int:
        return sum(t.upload for t in self.tensors)

    def decomposed(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors if t.decomposed}

    def lines(self) -> list[str]:
        """One line per tensor (how it is decomposed, or why it stays dense), then the total."""
        out = []
        for t in self.tensors:
            if t.decomposed and self.kind in LORA_METHODS:
                m, n = matrix_shape(t.shape)
                (r,) = t.sizes
                trained = f"B {m}x{r}" + (f", A {r}x{n}" if self.kind == "lora" else f" (A {r}x{n} frozen)")
                out.append(f"{t.name} {t.shape}: {self.kind} rank {r}, trains {trained} uploads {t.upload}/{t.numel}")
            elif t.decomposed:
                how = build_update(self.kind, self.pattern, t.shape, t.sizes).describe()
                out.append(f"{t.name} {t.shape}: {self.pattern} {how} uploads {t.upload}/{t.numel}")
            else:
                out.append(f"{t.name} {t.shape}: dense ({t.reason}) uploads {t.numel}")
        ref = self.dense_reference
        if self.kind in LORA_METHODS:
            trained = self.upload
            out.append(f"upload {trained} values vs dense {ref}: ratio {trained / ref:.5f} (1/{ref / trained:.1f})")
            return out
        out.append(f"upload {self.upload} values vs dense {ref}: ratio {self.upload / ref:.5f} (1/{ref / self.upload:.1f})")
        return out


def weight_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Floating parameters with two or more dimensions, by state_dict name: what can be decomposed."""
    return {
        name: tuple(p.shape)
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.dim() >= 2
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


def _resolve_dense(requested: tuple[str, ...], candidates: list[str]) -> tuple[dict[str, str], list[str]]:
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


def plan_decomposition(model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
    """Decide, for every floating tensor of ``model``, dense or decomposed and how large.

    ``config.method``: ``fedavg`` keeps everything dense; ``fedmud`` plans updates of
    ``config.kind``/``config.pattern``; ``fedlmt`` plans rank-``r`` factorisations of
    the weights themselves (``mat``/``ab`` sizes: ``r(m+n)`` values, rank ``r``);
    ``fedpara`` plans FedPara's low-rank Hadamard products of the weights themselves
    (:class:`~fedmud.decomposition.LowRankHadamardProduct`: ``2r(m+n)`` values, rank up
    to ``min(r², m, n)``), ``r`` per tensor chosen so that everything uploaded meets
    ``config.ratio``. Raises :class:`ConfigError` when the ratio cannot be reached.
    """
    floating = {n: tuple(t.shape) for n, t in unique_state(model).items() if torch.is_floating_point(t)}
    if config.method == "fedavg":
        tensors = tuple(TensorPlan(n, s, math.prod(s), reason="method=fedavg") for n, s in floating.items())
        return DecompositionPlan(tensors, config.kind, config.pattern, None)
    if config.method in LORA_METHODS:
        return _plan_lora(config, floating, weight_tensors(model))
    kind, pattern = FACTORISED.get(config.method, (config.kind, config.pattern))
    weights = weight_tensors(model)
    candidates = [n for n in floating if n in weights]
    dense, preferred = _resolve_dense(config.dense_layers, candidates)
    for name in candidates:
        if name in dense:
            continue
        if smallest_cost(kind, pattern, weights[name]) >= math.prod(weights[name]):
            dense[name] = f"too small: the smallest update uploads {smallest_cost(kind, pattern, weights[name])}"
    for name, shape in floating.items():
        if name not in weights:
            dense[name] = "1-D" if len(shape) < 2 else "buffer"
    target = math.floor(config.ratio * sum(math.prod(s) for s in floating.values()))

    def need(dense_names) -> int:
        """The smallest upload with ``dense_names`` dense and every other candidate at its smallest."""
        return sum(
            math.prod(s) if n in dense_names else smallest_cost(kind, pattern, s) for n, s in floating.items()
        )

    if need(dense) > target:
        raise _unreachable(config, floating, dense, kind, pattern, need(dense))
    for name in preferred:  # the paper's first/last layers, dense only when the rest still fits
        if name not in dense and need({**dense, name: ""}) <= target:
            dense[name] = "first/last layer, fits the ratio"
    rest = {n: weights[n] for n in candidates if n not in dense}
    budget = target - sum(math.prod(floating[n]) for n in dense)
    sizes = allocate_sizes(kind, pattern, rest, budget) if rest else {}
    tensors = []
    for name, shape in floating.items():
        if name in sizes:
            tensors.append(TensorPlan(name, shape, build_update(kind, pattern, shape, sizes[name]).num_trainable, sizes[name]))
        else:
            tensors.append(TensorPlan(name, shape, math.prod(shape), reason=dense[name]))
    return DecompositionPlan(tuple(tensors), kind, pattern, config.ratio)


def lora_upload(method: str, shape: tuple[int, ...], rank: int) -> int:
    """Values a rank-``rank`` adapter of ``shape`` uploads: B and A (``lora``), B only (``ffa-lora``)."""
    m, n = matrix_shape(shape)
    return rank * (m + n) if method == "lora" else rank * m


def _plan_lora(
    config: DecompositionConfig, floating: Mapping[str, tuple[int, ...]], weights: Mapping[str, tuple[int, ...]]
) -> DecompositionPlan:
    """LoRA adapters of rank ``lora_rank`` on every weight tensor not kept dense.

    ``dense-layers=auto`` is the last layer (the classifier head is trained in full, as
    PEFT's ``modules_to_save`` does for a new head); biases, norms and their statistics
    are dense as always. A tensor whose adapter would upload as much as the tensor is dense.
    """
    candidates = [n for n in floating if n in weights]
    requested = tuple(LAST if item == AUTO else item for item in config.dense_layers)
    dense, _ = _resolve_dense(requested, candidates)
    start_rank = config.hrp_rank if config.init == "hrp" else config.lora_rank  # the preheat's rank under hrp
    tensors = []
    for name, shape in floating.items():
        if name not in weights:
            tensors.append(TensorPlan(name, shape, math.prod(shape), reason="1-D" if len(shape) < 2 else "buffer"))
            continue
        r = min(config.lora_rank, *matrix_shape(shape))
        upload = lora_upload(config.method, shape, r)
        if name in dense:
            tensors.append(TensorPlan(name, shape, math.prod(shape), reason=dense[name]))
        elif upload >= math.prod(shape):
            tensors.append(TensorPlan(name, shape, math.prod(shape), reason=f"too small: a rank-{r} adapter uploads {upload}"))
        else:
            start = min(start_rank, *matrix_shape(shape))
            tensors.append(TensorPlan(name, shape, lora_upload(config.method, shape, start), (start,)))
    return DecompositionPlan(tuple(tensors), config.method, "lora", None)


def _unreachable(
    config: DecompositionConfig,
    floating: Mapping[str, tuple[int, ...]],
    dense: Mapping[str, str],
    kind: str,
    pattern: str,
    need: int,
) -> ConfigError:
    """The error for a ratio the model cannot reach: the smallest ratio, and what uses it."""
    total = sum(math.prod(s) for s in floating.values())
    uses: dict[str, int] = {}
    for name, shape in floating.items():
        if name not in dense:
            uses[f"{name} (smallest {kind}/{pattern} update)"] = smallest_cost(kind, pattern, shape)
        elif dense[name] in ("1-D", "buffer"):
            uses["1-D tensors and buffers (biases, norms, running statistics)"] = (
                uses.get("1-D tensors and buffers (biases, norms, running statistics)", 0) + math.prod(shape)
            )
        else:
            uses[f"{name} (dense: {dense[name]})"] = math.prod(shape)
    top = sorted(uses.items(), key=lambda kv: -kv[1])[:5]
    floor = need / total
    listed = "; ".join(f"{what} {n}" for what, n in top)
    return ConfigError(
        f"ratio={config.ratio:.6g} (1/{1 / config.ratio:.1f}) cannot be reached with "
        f"dense-layers={','.join(config.dense_layers)}: at least {need} of the model's {total} values must "
        f"upload, so allowed: ratio >= {floor:.4g} (1/{1 / floor:.1f}). Most of it: {listed}. "
        f"Raise ratio or keep fewer tensors dense"
    )
