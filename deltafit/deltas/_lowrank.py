"""Low-rank pieces shared by the LoRA family (composed by each method, not inherited)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from deltafit.deltas._targets import is_transposed
from deltafit.frozen_casts import shared_input


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA, which keeps updates stable as r grows)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LowRankUpdate(nn.Module):
    """x -> scale * B A dropout(x), with A (r x in) Kaiming-uniform and B (out x r) zero.

    B starts at zero so the adapted model starts exactly at the base. Parameters are fp32 whatever
    the base dtype: low-rank updates are tiny next to W0 and lose their signal in bf16.
    """

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float, device=None):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = delta_input(x, self.A.dtype)
        if _lean_dropout_applies(self.dropout, x):
            down = _DroppedDownProjection.apply(x, *_draw_noise(self.dropout.p, x), self.A)
        else:
            down = matmul_input(x, self.A.dtype, self.dropout) @ self.A.t()
        return down @ self.B.t() * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update scale * B A, shaped like the host weight (out x in)."""
        return (self.B @ self.A) * self.scale

    def fold(self, linear: nn.Module) -> None:
        """W <- W + scale * B A. An fp32 weight takes it as one addmm: no out x in temporary for B A,
        about 3x faster over a whole model than forming it (merge cost is a load + save target);
        others go via fp32. A Conv1D stores W^T (in x out), so it takes (B A)^T = A^T B^T."""
        weight = linear.weight
        if weight.dtype == torch.float32:
            B, A = self.B.to(weight.device), self.A.to(weight.device)
            left, right = (A.t(), B.t()) if is_transposed(linear) else (B, A)
            _replace_weight(linear, torch.addmm(weight, left, right, alpha=self.scale))
        else:
            fold_into(linear, self.delta_weight())


def delta_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a delta path's matmuls take it: in the delta's own dtype (fp32), except under autocast.

    There the matmuls run in the autocast dtype whatever x's, so lifting a bf16 x to fp32 first
    would only add a copy each way (and two more in backward) per adapted layer, for the same
    result (bf16 -> fp32 -> bf16 is exact)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


def matmul_input(x: torch.Tensor, dtype: torch.dtype, dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """dropout(x) as a delta path's first matmul takes it. With no dropout to apply, under autocast
    with frozen casts cached, that is the bf16 cast of x which the base layer (and any other delta on
    x) already made (frozen_casts.shared_input): the values the matmul's own cast would give."""
    x = delta_input(x, dtype)
    return dropout(x) if dropout is not None and _dropout_acts(dropout) else shared_input(x)


def _dropout_acts(dropout: nn.Module) -> bool:
    """A dropout that changes its input now (nn.Identity and p = 0 never do; none does in eval)."""
    return dropout.training and getattr(dropout, "p", 0.0) > 0


def _lean_dropout_applies(dropout: nn.Module, x: torch.Tensor) -> bool:
    # On CUDA (and other accelerators) torch's fused dropout already keeps a bool mask, and draws its
    # noise differently: left to torch, so results there stay exactly what they were.
    return x.device.type == "cpu" and _dropout_acts(dropout) and dropout.p < 1 and torch.is_grad_enabled()


def _draw_noise(p: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(keep mask, float noise, keep probability), drawn as torch's CPU dropout draws them."""
    noise = torch.empty_like(x).bernoulli_(1 - p)
    return noise.bool(), noise.div_(1 - p), 1 - p


class _DroppedDownProjection(torch.autograd.Function):
    """dropout(x) @ A^T keeping x and the bool mask for backward, not the dropped-out copy of x.

    Off the GPU, torch's dropout keeps its float noise (0 or 1/(1-p)) for backward, 4 bytes per
    element, and the A matmul keeps the dropped-out input as well. Here the noise is drawn exactly
    as torch draws it (`_draw_noise`) and only its 0/1 pattern is kept, as bool; A's gradient,
    which needs dropout(x), rebuilds it in backward from x and the mask (one multiply). The adapted
    projections of one layer read the same x (q, k and v; gate and up), so they keep one x between
    them where each kept its own dropped-out copy: for q/v LoRA on SmolLM2 at 8 x 256 tokens,
    135 MB less. Values and gradients are torch's, bit for bit (the matmuls below are the ones
    autograd runs for `dropout(x) @ A.t()`).

    Under autocast (train.mixed_precision bf16/fp16) the forward matmul runs in the autocast dtype,
    so `grad` arrives in it while x and A are fp32; backward runs outside autocast, so it casts as
    autocast did in forward: the matmuls in grad's dtype, each result back to its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, keep, noise, q, A):
        ctx.save_for_backward(x, keep, A)
        ctx.q = q
        return (x * noise) @ A.t()

    @staticmethod
    def backward(ctx, grad):
        x, keep, A = ctx.saved_tensors
        noise = keep.to(x.dtype).div_(ctx.q)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ A.to(grad.dtype)).view(x.shape).to(x.dtype) * noise
        if ctx.needs_input_grad[4]:
            dropped = (x * noise).to(grad.dtype).reshape(-1, x.shape[-1])
            grad_A = grad_2d.t().mm(dropped).to(A.dtype)
        return grad_x, None, None, None, grad_A


def fold_into(linear: nn.Module, delta: torch.Tensor) -> None:
    """W <- W + delta (out x in), computed in fp32 and stored back in the weight's own dtype; a
    Conv1D's weight (in x out) takes delta^T."""
    weight = linear.weight
    delta = delta.to(weight.device, torch.float32)
    delta = delta.t() if is_transposed(linear) else delta
    _replace_weight(
        linear, weight + delta if weight.dtype == torch.float32 else (weight.float() + delta).to(weight.dtype)
    )


def _replace_weight(linear: nn.Module, merged: torch.Tensor) -> None:
    """Give the weight Parameter new data (the same object: tied modules see the change too).

    Not an in-place update: transformers loads safetensors weights memory-mapped, and writing into
    such a weight copies it page by page on first touch (about 13 us per 4 KiB page here: 1.8 s for
    SmolLM2's 210 linear layers, vs 0.17 s to read each one once into a new tensor)."""
    with torch.no_grad():
        linear.weight.data = merged


def seeded_kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in) (Kaiming, ReLU gain) drawn from `generator` on the CPU.

    Frozen random projections that are regenerated instead of stored (VeRA's shared A and B) need
    a private seeded generator; this is PEFT's `_kaiming_init`, so the same seed gives PEFT's values.
    """
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


# -- training-time schedules shared by AdaLoRA and AFLoRA ---------------------------------------


def cubic_schedule(step: int, start: int, end: int, initial: int, final: int) -> int:
    """`initial` until `start`, then down to `final` along (1 - progress)^3, `final` from `end` on.

    The cubic schedule of AdaLoRA's rank budget (written exactly as PEFT's `budget_schedule`, so the
    integers agree) and of AFLoRA's count of still-trainable projections: it moves fast early,
    while the scores are coarse, and settles slowly.
    """
    if step <= start:
        return initial
    if step >= end:
        return final
    remaining = 1 - (step - start) / (end - start)
    return int((initial - final) * (remaining**3) + final)


class ImportanceEMA:
    """Per-element importance smoothed over steps: sensitivity Ibar and uncertainty Ubar.

    Ibar <- b1 Ibar + (1-b1) I;  Ubar <- b2 Ubar + (1-b2) |I - Ibar|;  score = Ibar * Ubar
    (AdaLoRA eq. 6-8; AFLoRA reuses it on windowed gradient magnitudes). Keyed by parameter name.
    """

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ibar: dict[str, torch.Tensor] = {}
        self.ubar: dict[str, torch.Tensor] = {}

    def update(self, name: str, importance: torch.Tensor) -> None:
        ibar = self.ibar.get(name, torch.zeros_like(importance))
        ubar = self.ubar.get(name, torch.zeros_like(importance))
        ibar = self.beta1 * ibar + (1 - self.beta1) * importance
        self.ubar[name] = self.beta2 * ubar + (1 - self.beta2) * (importance - ibar).abs()
        self.ibar[name] = ibar

    def score(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Ibar * Ubar (zeros for a tensor never updated)."""
        if name not in self.ibar:
            return torch.zeros_like(like, dtype=torch.float32)
        return self.ibar[name] * self.ubar[name]

    def reset(self) -> None:
        self.ibar.clear()
        self.ubar.clear()

    def state(self) -> dict:
        return {"ibar": dict(self.ibar), "ubar": dict(self.ubar)}

    def load(self, state: dict, device=None) -> None:
        self.ibar = {k: v.to(device) for k, v in state.get("ibar", {}).items()}
        self.ubar = {k: v.to(device) for k, v in state.get("ubar", {}).items()}


def orthogonality_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """||M M^T - I||_F for M with orthonormal rows wanted (AdaLoRA's regularizer; pass B^T for B)."""
    gram = matrix @ matrix.T
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))


# -- spectral pieces shared by LaMDA and LaMDA++ -------------------------------------------------


def principal_subspace(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, Vh_r): the top-r left (out x r) and right (r x in) singular vectors of W (out x in).

    Computed in float64 with a canonical sign (the largest-magnitude entry of each right singular
    vector is positive; an SVD only fixes each pair up to a joint flip), so the same weight always
    gives the same factors: LaMDA rebuilds its frozen projection from W0 when a checkpoint is loaded.
    """
    w = weight.detach().to(torch.float64)
    if w.device.type not in ("cpu", "cuda"):  # no float64 SVD on e.g. MPS
        w = w.cpu()
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    u, vh = u[:, :r], vh[:r]
    sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
    sign[sign == 0] = 1
    return (u * sign.T).to(weight.device), (vh * sign).to(weight.device)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of W, largest first, in float64 (cheaper than a full SVD)."""
    w = weight.detach().to(torch.float64)
    return torch.linalg.svdvals(w if w.device.type in ("cpu", "cuda") else w.cpu())


class SpectralUpdate(nn.Module):
    """LaMDA's path x -> scale * B S A x (Azizi et al. 2024), with W0 = U diag(s) Vh:

    - A = Vh[:r] (r x in), a buffer: frozen for the whole run, rebuilt from W0 at attach (see
      `principal_subspace`), so it is never saved and never reaches the optimizer;
    - S (r x r) trainable, zero at init so the adapted model starts exactly at the base;
    - B = U[:, :r] (out x r), one (out x 1) parameter per column so columns can be frozen one at a
      time for real (`freeze`): a column with requires_grad=False gets no .grad, and AdamW neither
      moves it by momentum nor decays it.

    Nothing wider than r is kept for backward: A is frozen, so x is not saved (only its r-dim
    projection, for S's gradient, and S's r-dim output, for B's). Dropout acts on the r-dim code
    A x for the same reason. Parameters are fp32 whatever the base dtype.
    """

    def __init__(self, weight: torch.Tensor, r: int, scale: float, dropout: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.scale, self.rank, self.frozen = scale, r, 0
        a = torch.zeros(r, in_features, device=weight.device, dtype=torch.float32)
        b = torch.zeros(out_features, r, device=weight.device, dtype=torch.float32)
        if weight.device.type != "meta":  # planning on a weightless model: shapes only
            u, vh = principal_subspace(weight, r)
            a, b = vh.float(), u.float()
        self.register_buffer("A", a, persistent=False)
        self.S = nn.Parameter(torch.zeros(r, r, device=weight.device, dtype=torch.float32))
        self.B = nn.ParameterList([nn.Parameter(b[:, j:j + 1].clone()) for j in range(r)])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.dropout(matmul_input(x, self.A.dtype) @ self.A.t())
        return (code @ self.S.t()) @ self.b_matrix().t() * self.scale

    def b_matrix(self) -> torch.Tensor:
        return torch.cat(list(self.B), dim=1)

    def delta_weight(self) -> torch.Tensor:
        """The dense update scale * B S A, shaped like the host weight (out x in)."""
        return self.b_matrix() @ self.S @ self.A * self.scale

    def freeze(self, count: int) -> None:
        """Freeze B's first `count` columns (largest singular value first); frozen ones stay frozen."""
        self.frozen = min(self.rank, max(self.frozen, count))
        for j, column in enumerate(self.B):
            column.requires_grad_(j >= self.frozen)


def columns_frozen(step: int, total_steps: int, rank: int, freeze_by: float) -> int:
    """How many of B's `rank` columns are frozen after `step` optimizer steps: rising linearly to all
    of them at step t_i = ceil(freeze_by * total_steps); all from the start when freeze_by is 0."""
    until = math.ceil(freeze_by * total_steps)
    return rank if until <= 0 else min(rank, rank * step // until)


# -- initializations that move the top of W0 into B A (LoRA's `init: pissa | olora`) -------------


def base_factors(weight: torch.Tensor, r: int, scale: float, kind: str,
                 niter: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0), fp32, with scale * B0 A0 the part of W0 (out x in) that moves into the LoRA path.

    pissa (Meng et al. 2024): W0 = U S Vh, A0 = sqrt(S_r / scale) Vh_r, B0 = U_r sqrt(S_r / scale), so
    scale * B0 A0 is W0's best rank-r approximation (with `niter`, a randomized SVD's estimate of
    it: Halko et al., oversampled by 8 columns; the model still starts exactly at the base because
    the residual subtracts whatever factors were drawn); olora (Buyukakyuz 2024): W0 = Q R, B0 = Q_r,
    A0 = R_r (PEFT's OLoRA, no division by scale). Both as PEFT computes them (fp32, on W0's device).
    """
    w = weight.detach().float()
    if kind == "pissa":
        u, s, vh = _svd(w, r, niter)
        root = torch.sqrt(s[:r] / scale)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _svd(w: torch.Tensor, r: int, niter: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh (at least r singular triplets, largest first): exact, or randomized with `niter`."""
    if niter is None:
        return torch.linalg.svd(w, full_matrices=False)
    u, s, v = torch.svd_lowrank(w, q=min(r + 8, *w.shape), niter=niter)
    return u, s, v.T


def residual_weight(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 - scale * B0 A0 in W0's dtype: the frozen base under a PiSSA/OLoRA path. One function for
    attach and checkpoint reload, so the same W0 and factors always give the same bits."""
    w = weight.detach().float()
    return torch.addmm(w, B0.to(w.device), A0.to(w.device), alpha=-scale).to(weight.dtype)


def replace_dense_weight(linear: nn.Module, dense: torch.Tensor) -> None:
    """Give `linear` the weight `dense` (out x in) in its own layout (a Conv1D stores in x out)."""
    _replace_weight(linear, dense.t().contiguous() if is_transposed(linear) else dense)
