"""``method=lora`` and ``method=ffa-lora``: fine-tuning with persistent LoRA adapters.

Each planned tensor gets a :class:`LoRAAdapter`, ``W0 -> W0 + (α/r)·B·A``, on the pretrained
weight W0, which stays frozen for the whole run and is never uploaded. The adapters persist
across rounds and are averaged: ``lora`` trains both (FedIT; inexact, mean(B)·mean(A) ≠
mean(B·A)), ``ffa-lora`` freezes A and trains B (exact). ``init=hrp`` (``lora`` only) trains
the adapters at ``hrp-rank`` for the preheat and then replaces each by the top ``lora-rank``
SVD of its product (:meth:`LoRAAdapter.truncate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layout import UploadLayout
from ..decomposition import matrix_shape
from ..errors import ConfigError
from ..plan import AUTO, LAST, DecompositionPlan, TensorPlan, aliases, floating_shapes, resolve_dense, weight_tensors
from .base import Method, register

if TYPE_CHECKING:
    from ..config import DecompositionConfig, RunConfig
    from ..mud import DecomposedModel


class LoRAAdapter(nn.Module):
    """A persistent LoRA adapter, ``W -> W + (α/r)·B·A`` (``method=lora`` or ``ffa-lora``).

    In the (m, n) view of :func:`~fedmud.decomposition.matrix_shape`, A is (r, n) and B (m, r):
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

    def __init__(
        self, shape: tuple[int, ...], rank: int, config: DecompositionConfig, device: torch.device, train_a: bool = True
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.m, self.n = matrix_shape(self.shape)
        self.train_a = train_a  # ffa-lora freezes A
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
        if self.train_a:
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


def _head_is_tied(model: nn.Module) -> bool:
    """Whether the model's last weight matrix, in module order, is another name of an earlier one."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.dim() >= 2 and p.requires_grad]
    tied = {alias for group in aliases(model).values() for alias in group[1:]}
    return bool(names) and names[-1] in tied


class LoRA(Method):
    """LoRA adapters of rank ``lora-rank`` on every weight tensor not kept dense, both factors trained."""

    name = "lora"
    help = (
        "fine-tunes with persistent LoRA adapters W0 + (α/r)·B·A, trains and averages both (FedIT; inexact, as "
        "mean(B)·mean(A) ≠ mean(B·A); see [Fine-tuning](#fine-tuning-a-pretrained-model-lora))"
    )
    inits = ("zero", "nonzero", "hrp")
    # Init[A], PEFT's own: Init[AB]'s kept initial product is noise on every pretrained weight, which cost a
    # pretrained language model 242 -> 2,115 perplexity at round 0 and the worst LoRA results at every
    # learning rate (docs/finetune-lm.md); it helped only a CNN that scored 0 on its new classes (docs/finetune.md)
    default_init = "zero"
    # issue 27's evidence: int4 uploads rounded without bias cost nothing measurable at 1/7.5 of float32's
    # bytes, on the Llama-style LM (docs/finetune-lm.md, "Codecs") and the CNN (docs/finetune.md, "Codecs")
    default_uplink = "int4"
    preheats = True
    train_a = True

    def upload(self, shape: tuple[int, ...], rank: int) -> int:
        """Values a rank-``rank`` adapter of ``shape`` uploads: B and A."""
        m, n = matrix_shape(shape)
        return rank * (m + n)

    def plan(self, model: nn.Module, config: DecompositionConfig) -> DecompositionPlan:
        """``dense-layers=auto`` is the last layer (the classifier head is trained in full, as
        PEFT's ``modules_to_save`` does for a new head), unless the head is tied to an input
        embedding: then it is that embedding and is adapted, not shipped dense (it is the model's
        largest matrix). Biases, norms and their statistics are dense as always. A tensor whose adapter would upload as much as the tensor is dense.
        """
        floating, weights = floating_shapes(model), weight_tensors(model)
        candidates = [n for n in floating if n in weights]
        # auto: the head; a head tied to the token embedding (GPT-2, T5, Llama's tie) gets its adapter
        head = () if _head_is_tied(model) else (LAST,)
        requested = tuple(x for item in config.dense_layers for x in (head if item == AUTO else (item,)))
        dense, _ = resolve_dense(requested, candidates)
        start_rank = config.hrp_rank if config.init == "hrp" else config.lora_rank  # the preheat's rank under hrp
        tensors = []
        for name, shape in floating.items():
            if name not in weights:
                tensors.append(TensorPlan(name, shape, math.prod(shape), reason="1-D" if len(shape) < 2 else "buffer"))
                continue
            r = min(config.lora_rank, *matrix_shape(shape))
            upload = self.upload(shape, r)
            if name in dense:
                tensors.append(TensorPlan(name, shape, math.prod(shape), reason=dense[name]))
            elif upload >= math.prod(shape):
                tensors.append(TensorPlan(name, shape, math.prod(shape), reason=f"too small: a rank-{r} adapter uploads {upload}"))
            else:
                start = min(start_rank, *matrix_shape(shape))
                tensors.append(TensorPlan(name, shape, self.upload(shape, start), (start,), how=self.describe(shape, start)))
        return DecompositionPlan(tuple(tensors), self.name, None)

    def describe(self, shape: tuple[int, ...], rank: int) -> str:
        m, n = matrix_shape(shape)
        return f"{self.name} rank {rank}, trains B {m}x{rank}, A {rank}x{n}"

    def parametrisation(self, tensor: TensorPlan, config: DecompositionConfig, device: torch.device) -> nn.Module:
        return LoRAAdapter(tensor.shape, tensor.sizes[0], config, device, train_a=self.train_a)

    def check(self, run: RunConfig) -> None:
        d = run.decomposition
        if d.init != "hrp":
            return
        if run.uplink.error_feedback:
            raise ConfigError(
                f"error-feedback=true is not allowed with method={self.name!r} and init='hrp': the adapters change "
                "rank after the preheat, and the carried error with them; set error-feedback=false or choose init "
                "zero or nonzero"
            )
        if d.hrp_rank <= d.lora_rank:
            raise ConfigError(
                f"hrp-rank={d.hrp_rank} is not allowed with lora-rank={d.lora_rank}: the preheat's rank must be "
                "above the adapters' rank (init='hrp')"
            )

    # ---------------------------------------------------------------- init=hrp
    def hrp_ready(self, model: DecomposedModel) -> bool:
        adapters = model.parametrisations().values()
        return model.config.init == "hrp" and all(a.rank == a.final_rank for a in adapters)

    def end_preheat(self, model: DecomposedModel, initial: Mapping[str, torch.Tensor]) -> None:
        """Replace every adapter by its top-r SVD (its rank, and so the upload's layout, change)."""
        adapters = model.parametrisations()
        for adapter in adapters.values():
            adapter.truncate()
        if adapters:
            model.layout_version += 1

    def hrp_names(self, model: DecomposedModel) -> set[str]:
        if model.config.init != "hrp":
            return set()
        return {f"{n}.{f}" for n in model.parametrisations() for f in ("A", "B")}

    def hrp_layout(self, model: DecomposedModel) -> UploadLayout:
        entries = []
        if model.config.init == "hrp":
            for name, a in model.parametrisations().items():
                entries += [(f"{name}.A", (a.final_rank, a.n)), (f"{name}.B", (a.m, a.final_rank))]
        order = {n: i for i, n in enumerate(model.state_items())}  # state order, as hrp_state()
        return UploadLayout(tuple(sorted(entries, key=lambda e: order[e[0]])))

    def fit_state(self, model: DecomposedModel, state: Mapping[str, torch.Tensor], what: str) -> int:
        """Each adapter takes the rank of ``state``'s factors (the preheat's or the final one)."""
        changed = 0
        for name, adapter in model.parametrisations().items():
            incoming = state.get(f"{name}.A")
            if incoming is not None and incoming.dim() == 2 and incoming.shape[0] != adapter.rank:
                try:
                    adapter.resize(incoming.shape[0])
                except ValueError as err:
                    raise ValueError(f"{what}: {name}.A has shape {tuple(incoming.shape)}: {err}") from None
                changed += 1
        return changed


class FFALoRA(LoRA):
    """FFA-LoRA (Sun et al., 2024): A frozen at its init, B trained, so averaging is exact."""

    name = "ffa-lora"
    help = "freezes A and trains B, so aggregation is exact"
    inits = ("zero", "nonzero")
    # Init[A]: a frozen A gains nothing from a non-zero B (docs/finetune.md)
    default_init = "zero"
    default_uplink = "float32"  # int4 is measured for LoRA's A and B together, not yet for B alone
    preheats = False
    train_a = False

    def upload(self, shape: tuple[int, ...], rank: int) -> int:
        """Values a rank-``rank`` adapter of ``shape`` uploads: B only."""
        m, _ = matrix_shape(shape)
        return rank * m

    def describe(self, shape: tuple[int, ...], rank: int) -> str:
        m, n = matrix_shape(shape)
        return f"{self.name} rank {rank}, trains B {m}x{rank} (A {rank}x{n} frozen)"


register(LoRA())
register(FFALoRA())
