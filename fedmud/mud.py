"""Model update decomposition (MUD) on any PyTorch model.

:func:`decompose` plans every floating tensor of the model (:mod:`fedmud.plan`) and
registers a :class:`DecomposedUpdate` as a PyTorch parametrisation
(``torch.nn.utils.parametrize``) on each tensor it decomposes: the module keeps
running its own forward, and reads ``W + ΔW(factors)`` wherever it reads the tensor
(Linear, convolutions, Embedding, attention ``in_proj_weight``, LSTM/GRU weights, a
bare ``nn.Parameter``). The base weight ``W`` is frozen for the round. A round is::

    model.reset(round_seed)      # every party draws the same factors from the seed
    ... train ...                # only trainable factors and dense tensors move
    model.merge()                # W <- W + ΔW, on the server after aggregation

Names: a decomposed tensor keeps its ``state_dict`` name (``encoder.layers.0.self_attn.in_proj_weight``)
and its factors are that name plus the factor (``...in_proj_weight.T1``).
What crosses the network is :meth:`DecomposedModel.uploaded_state`: trained factors
and every dense floating tensor (biases, norms and their running statistics, dense
layers). The global model is :meth:`DecomposedModel.global_state`, named as the
undecomposed model's state_dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .codec import UploadLayout
from .config import LORA_METHODS, DecompositionConfig
from .decomposition import UpdateParameterisation, build_update, matrix_shape
from .plan import DecompositionPlan, aliases, plan_decomposition, unique_state
from .seeds import derive_seed, draw_normal

HRP_PREFIX = "hrp_"
START_PREFIX = "start_"  # a trained factor's value at the round's start (not persistent)
# a parametrised tensor's state_dict entries: "<module.>parametrizations.<tensor>.original" and
# "<module.>parametrizations.<tensor>.0.<factor>"
_PARAMETRISED = re.compile(r"^(?P<module>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?:original|0\.(?P<part>.+))$")


class DecomposedUpdate(nn.Module):
    """The parametrisation ``W -> W + offset + ΔW(factors)`` of one tensor.

    Frozen factors are buffers, trained ones parameters; all are redrawn by
    :meth:`reset`. With ``compensate`` the round-start update ΔW(T0) is subtracted
    (``offset = -ΔW(T0)``), so the tensor starts the round equal to ``W`` exactly. The
    round-start trained factors T0 are kept, not the offset: for ``fab`` and ``aad``, whose
    ΔW is linear in what is trained, a training step computes ``W + ΔW(T - T0)``, with no
    tensor of the weight's size besides ``W`` and the output; merges compute
    ``offset + ΔW(T)`` exactly, as every party must. With ``init=hrp`` the anchors'
    directions (set once, after the preheat) are persistent buffers: part of the global model.
    """

    def __init__(self, update: UpdateParameterisation, config: DecompositionConfig, device: torch.device) -> None:
        super().__init__()
        self.update = update
        self.config = config
        fan_in = math.prod(update.weight_shape[1:])
        self._partner_std = config.init_scale / (math.sqrt(fan_in) * config.frozen_scale)
        for spec in update.factors:
            zeros = torch.zeros(spec.shape, device=device)
            if spec.trainable:
                self.register_parameter(spec.name, nn.Parameter(zeros))
            else:
                self.register_buffer(spec.name, zeros, persistent=False)
        self._compensated = False  # whether the round's trained factors started non-zero and are compensated
        for spec in update.factors:
            if spec.trainable:
                self.register_buffer(START_PREFIX + spec.name, torch.zeros(spec.shape, device=device), persistent=False)
        if config.init == "hrp":  # directions fixed after the preheat; part of the global model
            for term in update.terms:
                self.register_buffer(HRP_PREFIX + term.anchor, torch.zeros(self._spec(term.anchor).shape, device=device))
            self.register_buffer(HRP_PREFIX + "set", torch.zeros((), device=device))

    def _spec(self, name: str):
        return next(f for f in self.update.factors if f.name == name)

    @property
    def hrp_ready(self) -> bool:
        return self.config.init == "hrp" and bool(getattr(self, HRP_PREFIX + "set").item())

    def factor(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def delta_weight(self, exact: bool = False) -> torch.Tensor:
        """ΔW from the current factors, in the tensor's shape (``exact``: bitwise reproducible)."""
        return self.update.delta_weight({f.name: self.factor(f.name) for f in self.update.factors}, exact)

    def _start(self, name: str) -> torch.Tensor:
        return getattr(self, START_PREFIX + name)

    def offset(self, exact: bool = False) -> torch.Tensor | None:
        """``-ΔW(T0)``, the compensation of the round-start update (None when there is none)."""
        if not self._compensated:
            return None
        start = {f.name: self._start(f.name) if f.trainable else self.factor(f.name) for f in self.update.factors}
        return -self.update.delta_weight(start, exact)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Why the compensation is folded into the factors: the round must start at W exactly, so the
        # tensor is W + ΔW(T) - ΔW(T0). Subtracting a stored ΔW(T0) would keep one more tensor of the
        # weight's size per layer and add it every step. Under fab and aad each term is L·R with one
        # side frozen for the round (the anchor), so ΔW is linear in the trained side: L·R - L0·R =
        # (L - L0)·R, one term of the same size. Under ab both sides train and ΔW is bilinear
        # (A·B - A0·B0 does not factor), so -A0·B0 is added as terms of their own, each as small as
        # a factor pair. Either way the products are summed blockwise into W in one pass
        # (add_products) and nothing of the weight's size is built besides W and the output.
        pairs = []
        for term in self.update.terms:
            left, right = self.factor(term.left), self.factor(term.right)
            if self._compensated and self.update.pattern != "ab":  # ΔW(T) - ΔW(T0) = ΔW(T - T0)
                if term.partner == term.left:
                    left = left - self._start(term.left)
                else:
                    right = right - self._start(term.right)
            pairs.append((left, right))
        if self._compensated and self.update.pattern == "ab":  # bilinear: subtract A0·B0 as a term of its own
            pairs += [(-self._start(t.left), self._start(t.right)) for t in self.update.terms]
        return self.update.add_products(weight, pairs)

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """Draw every factor from ``seed`` (on CPU, then moved): identical on every device."""
        device = self.factor(self.update.factors[0].name).device
        hrp = self.hrp_ready
        zero_partners = self.config.init == "zero" or hrp
        for term in self.update.terms:
            anchor = self._spec(term.anchor)
            if hrp:
                self.factor(anchor.name).copy_(getattr(self, HRP_PREFIX + anchor.name))
            else:
                std = self.config.frozen_scale * anchor.iso_std
                self.factor(anchor.name).copy_(draw_normal(anchor.shape, derive_seed(seed, anchor.name), std, device))
            partner = self._spec(term.partner)
            if zero_partners:
                self.factor(partner.name).zero_()
            else:
                values = draw_normal(partner.shape, derive_seed(seed, partner.name), self._partner_std, device)
                self.factor(partner.name).copy_(values)
        for spec in self.update.factors:
            if spec.trainable:
                self._start(spec.name).copy_(self.factor(spec.name))
        self._compensated = self.config.init in ("nonzero-compensated", "hrp") and not zero_partners

    @torch.no_grad()
    def set_hrp_directions(self, delta: torch.Tensor) -> None:
        """Fix the anchors' directions from ``delta``, the preheat's merged update (see :mod:`.projection`)."""
        from .projection import hrp_directions

        for name, value in hrp_directions(self.update, delta, self.config.frozen_scale).items():
            getattr(self, HRP_PREFIX + name).copy_(value)
        getattr(self, HRP_PREFIX + "set").fill_(1.0)

    def anchors(self) -> dict[str, torch.Tensor]:
        """The frozen factors of this round."""
        return {f.name: self.factor(f.name).detach() for f in self.update.factors if not f.trainable}

    @torch.no_grad()
    def merged_increment(self) -> torch.Tensor:
        """``offset + ΔW`` computed exactly: what :meth:`DecomposedModel.merge` adds to ``W``."""
        offset = self.offset(exact=True)
        delta = self.delta_weight(exact=True)
        return delta if offset is None else offset + delta

    @torch.no_grad()
    def clear(self) -> None:
        """Zero every factor and the offset: the tensor equals ``W``."""
        for spec in self.update.factors:
            self.factor(spec.name).zero_()
            if spec.trainable:
                self._start(spec.name).zero_()
        self._compensated = False


class FactorizedWeight(nn.Module):
    """FedLMT-style parametrisation: the weight itself is ``U·V`` (rank ``r``), ``W`` unused.

    ``U`` is (m, r) and ``V`` (r, n) in the (m, n) view of :func:`~.decomposition.matrix_shape`;
    both are drawn with std ``sqrt(t / sqrt(r))`` so that ``U·V`` has the std ``t = 1/sqrt(fan_in)``.
    Parameters: ``r(m+n)`` against ``m·n``.
    """

    def __init__(self, shape: tuple[int, ...], rank: int, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        m, n = matrix_shape(self.shape)
        std = math.sqrt((1 / math.sqrt(math.prod(self.shape[1:]))) / math.sqrt(rank))
        self.U = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.V = nn.Parameter(torch.randn(rank, n, device=device) * std)
        self.rank = rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.U @ self.V).reshape(self.shape)


class HadamardLowRankWeight(nn.Module):
    """FedPara's parametrisation: the weight itself is the low-rank Hadamard product
    ``(X1·Y1ᵀ) ⊙ (X2·Y2ᵀ)``, ``W`` unused.

    X1, X2 are (m, r) and Y1, Y2 (n, r) in the (m, n) view of :func:`~.decomposition.matrix_shape`
    (a convolution as the repository views it, like FedLMT). Parameters: ``2r(m+n)`` against
    ``m·n``; rank up to ``min(r², m, n)``.

    Init: every factor i.i.d. N(0, s²) with ``s = (t/r)^(1/4)``. Each inner product is a sum of
    ``r`` products of two factors (variance ``r·s⁴``), and the two are independent with mean 0,
    so every entry of the weight has variance ``(r·s⁴)² = t²``. ``t² = 1/(3·fan_in)`` is the
    variance of PyTorch's default init of Linear and convolution weights (kaiming-uniform with
    ``a=√5``: U(±1/√fan_in)). Flower's FedPara baseline (after the authors' code) draws each
    factor with He init instead, which leaves the product's scale to ``r`` and the shapes.
    """

    def __init__(self, shape: tuple[int, ...], rank: int, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        m, n = matrix_shape(self.shape)
        target_std = 1 / math.sqrt(3 * math.prod(self.shape[1:]))
        std = (target_std / rank) ** 0.25
        self.X1 = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.Y1 = nn.Parameter(torch.randn(n, rank, device=device) * std)
        self.X2 = nn.Parameter(torch.randn(m, rank, device=device) * std)
        self.Y2 = nn.Parameter(torch.randn(n, rank, device=device) * std)
        self.rank = rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ((self.X1 @ self.Y1.T) * (self.X2 @ self.Y2.T)).reshape(self.shape)


class LoRAAdapter(nn.Module):
    """A persistent LoRA adapter, ``W -> W + (α/r)·B·A`` (``method=lora`` or ``ffa-lora``).

    In the (m, n) view of :func:`~.decomposition.matrix_shape`, A is (r, n) and B (m, r):
    ``r(m+n)`` parameters (``lora``: both trained) or ``r·m`` (``ffa-lora``: A frozen), rank
    at most r. W is the pretrained weight, frozen for the whole run; the adapters persist
    across rounds and are averaged (``lora``: mean(B)·mean(A) ≠ mean(B·A), inexact;
    ``ffa-lora``: mean(B)·A = mean(B·A), exact).

    Init, drawn from torch's global generator (every party builds the model under the run
    seed): A ~ U(±1/√n), as PEFT's Kaiming-uniform; B = 0 (``init=zero``, Init[A]) or, for
    ``nonzero`` (Init[AB], the initial product kept), B ~ N(0, σ²) with σ chosen so that
    (α/r)·B·A has ``lora_init_scale`` times the std of PyTorch's default init of W (1/√(3·fan_in)).
    ``hrp``: the adapter starts at the preheat's rank (``hrp_rank``) with B = 0;
    :meth:`truncate` then replaces it by the top-r SVD of its product.
    """

    def __init__(self, shape: tuple[int, ...], rank: int, config: DecompositionConfig, device: torch.device) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.m, self.n = matrix_shape(self.shape)
        self.method = config.method
        self.alpha = config.lora_alpha
        self.final_rank = min(config.lora_rank, self.m, self.n)
        self.start_rank = rank
        self._set(torch.zeros(rank, self.n, device=device), torch.zeros(self.m, rank, device=device))
        with torch.no_grad():
            self.A.uniform_(-1 / math.sqrt(self.n), 1 / math.sqrt(self.n))
            if config.init == "nonzero":
                weight_std = 1 / math.sqrt(3 * math.prod(self.shape[1:]))
                a_std = 1 / math.sqrt(3 * self.n)
                self.B.normal_(0.0, config.lora_init_scale * weight_std / (self.scale * math.sqrt(rank) * a_std))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _set(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """(Re)register the factors: B trained; A trained (``lora``) or a persistent buffer (``ffa-lora``)."""
        if self.method == "lora":
            self.A = nn.Parameter(A)
        else:
            self.register_buffer("A", A)
        self.B = nn.Parameter(B)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weight.reshape(self.m, self.n), self.B, self.A, alpha=self.scale).reshape(self.shape)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A in the tensor's shape."""
        return (self.scale * (self.B @ self.A)).detach().reshape(self.shape)

    @torch.no_grad()
    def resize(self, rank: int) -> None:
        """Zero factors of ``rank`` (the preheat's or the final one), to be loaded."""
        if rank not in (self.start_rank, self.final_rank):
            raise ValueError(f"a rank-{rank} adapter for {self.shape}; this run's are {self.start_rank} and {self.final_rank}")
        if rank != self.rank:
            device = self.A.device
            self._set(torch.zeros(rank, self.n, device=device), torch.zeros(self.m, rank, device=device))

    @torch.no_grad()
    def truncate(self) -> None:
        """Replace the adapter by the rank-``final_rank`` truncated SVD of its product (HRP).

        ΔW = (α/R)·B·A = U Σ Vᵀ; the new factors are B = U_r·√(Σ_r/s), A = √(Σ_r/s)·V_rᵀ with
        s = α/r, so (α/r)·B·A is the best rank-r approximation of ΔW (Eckart–Young) and both
        factors start non-zero, balanced. Computed in float64 from thin QRs of B and Aᵀ, so
        the cost is O((m+n)·R²), not an SVD of the m×n product.
        """
        if self.rank == self.final_rank:
            return
        B, A = self.B.detach().double().cpu(), self.A.detach().double().cpu()
        qb, rb = torch.linalg.qr(B)
        qa, ra = torch.linalg.qr(A.T)
        u, sigma, vh = torch.linalg.svd(self.scale * rb @ ra.T)
        r = self.final_rank
        root = (sigma[:r] / (self.alpha / r)).sqrt()
        new_b = (qb @ u[:, :r]) * root
        new_a = root[:, None] * (vh[:r] @ qa.T)
        device, dtype = self.A.device, self.A.dtype
        self._set(new_a.to(device, dtype), new_b.to(device, dtype))


# the methods whose parametrisation is the weight itself (its factors trained and averaged, no MUD)
FACTORISED_WEIGHTS = {"fedlmt": FactorizedWeight, "fedpara": HadamardLowRankWeight}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module holding the tensor, its attribute name) for a state_dict name."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _public_name(raw: str) -> str:
    """A parametrised model's state_dict name as the undecomposed model's (factors: tensor + '.' + factor)."""
    match = _PARAMETRISED.match(raw)
    if match is None:
        return raw
    tensor = match["module"] + match["tensor"]
    return tensor if match["part"] is None else f"{tensor}.{match['part']}"


def _copy_into(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise KeyError(f"{what} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
        tensor.copy_(state[name])


class DecomposedModel(nn.Module):
    """A model whose planned tensors train a decomposed update (see the module docstring).

    ``plan`` is the :class:`~fedmud.plan.DecompositionPlan` it follows; ``method=fedlmt``
    registers :class:`FactorizedWeight` instead, ``method=fedpara``
    :class:`HadamardLowRankWeight`, ``lora``/``ffa-lora`` a persistent :class:`LoRAAdapter`
    (never merged: W stays the pretrained weight), and ``fedavg`` registers nothing.
    """

    def __init__(self, model: nn.Module, config: DecompositionConfig) -> None:
        super().__init__()
        self.config = config
        self.plan: DecompositionPlan = plan_decomposition(model, config)
        self.dense_reference_numel = self.plan.dense_reference
        # the undecomposed model's state (names, shapes, dtypes): what dense FedAvg sends down
        self.reference_state = {n: torch.empty_like(t, device="meta") for n, t in unique_state(model).items()}
        self.decomposed_names: tuple[str, ...] = ()
        self.factorized_names: tuple[str, ...] = ()
        self.adapter_names: tuple[str, ...] = ()
        self.layout_version = 0  # bumped whenever a tensor's shape in the upload changes (HRP LoRA's switch)
        # Why parametrisations: each planned tensor becomes W + ΔW(factors) through
        # torch.nn.utils.parametrize, so the user's module runs its own forward unchanged (any model:
        # a CNN, a Hugging Face transformer, a timm net) and reads its weight from the parametrisation.
        # W itself (``original``) is frozen: of a planned tensor only the factors train, so only they have gradients
        # and optimiser state, and a merge is the one place W changes. A weight tied to others (an
        # embedding shared with the output layer) gets the same parametrisation object on every
        # alias, so all of them read one W + ΔW and the update is uploaded once.
        planned = self.plan.decomposed()
        tied = aliases(model)
        for name, tensor_plan in planned.items():
            device = model.get_parameter(name).device
            if config.method in LORA_METHODS:
                parametrisation = LoRAAdapter(tensor_plan.shape, tensor_plan.sizes[0], config, device)
            elif config.method in FACTORISED_WEIGHTS:
                parametrisation = FACTORISED_WEIGHTS[config.method](tensor_plan.shape, *tensor_plan.sizes, device)
            else:
                update = build_update(config.kind, config.pattern, tensor_plan.shape, tensor_plan.sizes)
                parametrisation = DecomposedUpdate(update, config, device)
            for alias in tied.get(name, [name]):  # a tied weight: every module reads W + ΔW of one update
                owner, attr = _owner(model, alias)
                parametrize.register_parametrization(owner, attr, parametrisation)
                owner.parametrizations[attr].original.requires_grad_(False)
        if config.method in LORA_METHODS:
            self.adapter_names = tuple(planned)
        elif config.method in FACTORISED_WEIGHTS:
            self.factorized_names = tuple(planned)
        else:
            self.decomposed_names = tuple(planned)
        self.model = model
        # public names of the state entries each view leaves out
        updates = self.updates()
        self._trained_factor_names = {
            f"{n}.{f.name}" for n, u in updates.items() for f in u.update.factors if f.trainable
        }
        self._hrp_names = {n for n in self._public_state() if HRP_PREFIX in n.rpartition(".")[2]}
        # the pretrained weights under adapters, and ffa-lora's frozen A: global, never uploaded
        self._not_uploaded = set(self.adapter_names) | (
            {f"{n}.A" for n in self.adapter_names} if config.method == "ffa-lora" else set()
        )

    # ------------------------------------------------------------------ structure
    def _parametrisations(self, names: tuple[str, ...]) -> dict[str, nn.Module]:
        """Tensor name -> the parametrisation module registered on it."""
        out = {}
        for name in names:
            owner, attr = _owner(self.model, name)
            out[name] = owner.parametrizations[attr][0]
        return out

    def updates(self) -> dict[str, DecomposedUpdate]:
        """Tensor name -> its decomposed update (the parametrisation module)."""
        return self._parametrisations(self.decomposed_names)

    def adapters(self) -> dict[str, LoRAAdapter]:
        """Tensor name -> its LoRA adapter (``method=lora``/``ffa-lora``)."""
        return self._parametrisations(self.adapter_names)

    def base_weight(self, name: str) -> torch.Tensor:
        """``W`` of a decomposed tensor: the value the round's update is added to."""
        owner, attr = _owner(self.model, name)
        return owner.parametrizations[attr].original

    def effective_weight(self, name: str) -> torch.Tensor:
        """What the model computes with: ``W + offset + ΔW`` for a decomposed tensor."""
        owner, attr = _owner(self.model, name)
        return getattr(owner, attr)

    def _public_state(self) -> dict[str, torch.Tensor]:
        """Every state tensor once (tied weights and their factors under the first name), publicly named."""
        return {_public_name(n): t for n, t in unique_state(self.model, keep_vars=True).items()}

    def _global_items(self) -> dict[str, torch.Tensor]:
        """Base weights, HRP directions and everything dense, named as in the undecomposed model.

        FedLMT's and FedPara's factorised tensors are their factors (``U``, ``V``; ``X1``, ``Y1``,
        ``X2``, ``Y2``); the unused ``W`` is left out.
        """
        return {
            n: t
            for n, t in self._public_state().items()
            if n not in self._trained_factor_names and n not in self.factorized_names
        }

    def _uploaded_items(self) -> dict[str, torch.Tensor]:
        """Trained factors and dense floating tensors (frozen factors and offsets are not persistent)."""
        skip = set(self.decomposed_names) | set(self.factorized_names) | self._hrp_names | self._not_uploaded
        return {n: t for n, t in self._public_state().items() if n not in skip and torch.is_floating_point(t)}

    def upload_layout(self) -> UploadLayout:
        items = self._uploaded_items()
        statistics = frozenset(
            f"{prefix}.{stat}" if prefix else stat
            for prefix, module in self.model.named_modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            for stat in ("running_mean", "running_var")
        ) & set(items)
        return UploadLayout(tuple((n, tuple(t.shape)) for n, t in items.items()), statistics)

    # ------------------------------------------------------------------ state
    def uploaded_state(self) -> dict[str, torch.Tensor]:
        """What a client sends: trained factors and densely trained tensors (detached)."""
        return {n: t.detach() for n, t in self._uploaded_items().items()}

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model, keyed like the undecomposed model's state_dict."""
        return {n: t.detach() for n, t in self._global_items().items()}

    @torch.no_grad()
    def load_uploaded_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an (aggregated, decoded) upload; norm layers' running variances are kept >= 0.

        A lossy code (``sign`` decodes every value of a chunk to ± its mean magnitude) can push
        a small variance below zero, and BatchNorm's evaluation would then take a square root of
        a negative number. The clamp is elementwise, so server and clients stay bitwise equal.
        """
        _copy_into(self._uploaded_items(), state, "uploaded state")
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_var is not None:
                module.running_var.clamp_(min=0.0)

    @torch.no_grad()
    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a global state; LoRA adapters take the rank the state's factors have (HRP's switch)."""
        self._resize_adapters(state, "global state")
        _copy_into(self._global_items(), state, "global state")

    def _resize_adapters(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        for name, adapter in self.adapters().items():
            incoming = state.get(f"{name}.A")
            if incoming is not None and incoming.dim() == 2 and incoming.shape[0] != adapter.rank:
                try:
                    adapter.resize(incoming.shape[0])
                except ValueError as err:
                    raise ValueError(f"{what}: {name}.A has shape {tuple(incoming.shape)}: {err}") from None
                self.layout_version += 1

    # ------------------------------------------------------------------ round
    def reset(self, round_seed: int) -> None:
        """Draw every update's factors from (round seed, tensor name)."""
        for name, update in self.updates().items():
            update.reset(derive_seed(round_seed, name))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every update into its base weight, ``W <- W + offset + ΔW``; then the model computes with W."""
        for name, update in self.updates().items():
            self.base_weight(name).add_(update.merged_increment())
            update.clear()

    def clear(self) -> None:
        """Zero every update's factors: the model computes with W."""
        for update in self.updates().values():
            update.clear()

    # ------------------------------------------------------------------ high-rank preheating
    @property
    def hrp_ready(self) -> bool:
        """Whether the preheat is over: MUD's directions are set, or LoRA's adapters have their final rank."""
        if self.adapter_names:
            adapters = self.adapters().values()
            return self.config.init == "hrp" and all(a.rank == a.final_rank for a in adapters)
        return any(update.hrp_ready for update in self.updates().values())

    def set_hrp_directions(self, initial: Mapping[str, torch.Tensor]) -> None:
        """End the preheat. MUD: fix every update's anchor directions from the change since
        ``initial`` (a global state). LoRA: replace every adapter by its top-r SVD."""
        for adapter in self.adapters().values():
            adapter.truncate()
        if self.adapter_names:
            self.layout_version += 1
        for name, update in self.updates().items():
            base = self.base_weight(name)
            update.set_hrp_directions(base - initial[name].to(base.device))

    def hrp_state(self) -> dict[str, torch.Tensor]:
        """What the end of the preheat fixed, named as in :meth:`global_state` (empty unless
        ``init=hrp``): MUD's directions, or LoRA's truncated adapters."""
        if self.adapter_names:
            names = {f"{n}.{f}" for n in self.adapter_names for f in ("A", "B")} if self.config.init == "hrp" else set()
        else:
            names = self._hrp_names
        return {n: t.detach() for n, t in self._public_state().items() if n in names}

    def hrp_layout(self) -> UploadLayout:
        """Names and shapes of :meth:`hrp_state` once the preheat is over (what rides on that link)."""
        if not self.adapter_names:
            return UploadLayout(tuple((n, tuple(t.shape)) for n, t in self.hrp_state().items()))
        entries = []
        if self.config.init == "hrp":
            for name, a in self.adapters().items():
                entries += [(f"{name}.A", (a.final_rank, a.n)), (f"{name}.B", (a.m, a.final_rank))]
        order = {n: i for i, n in enumerate(self._public_state())}  # state order, as hrp_state()
        return UploadLayout(tuple(sorted(entries, key=lambda e: order[e[0]])))

    @torch.no_grad()
    def load_hrp_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.adapter_names:
            self._resize_adapters(state, "HRP adapters")
            names = {n for n, _ in self.hrp_layout().entries}
            items = {n: t for n, t in self._public_state().items() if n in names}
        else:
            items = {n: t for n, t in self._public_state().items() if n in self._hrp_names}
        _copy_into(items, state, "HRP directions")

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> list[str]:
        """One line per floating tensor (how it is decomposed, or why it is dense), then the total."""
        return self.plan.lines()


def decompose(model: nn.Module, config: DecompositionConfig) -> DecomposedModel:
    """Plan ``model`` per ``config`` and parametrise it in place; factors are zero (it computes
    as ``model``) until :meth:`DecomposedModel.reset`."""
    return DecomposedModel(model, config)
