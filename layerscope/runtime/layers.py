"""Mixture-of-LoRA-experts (and MoR) wrappers around a frozen linear layer.

y = W₀x + (α/r) · Σ_{e ∈ top-k(x)} w_e(x) · ΔW_e · dropout(x)

LoRA experts:  ΔW_e = B_e A_e, each expert with its own A_e (r × in) and B_e (out × r).
MoR experts:   ΔW_e = diag(λ_B,e) B diag(λ_A,e) A — one shared A, B per module and per-expert
               scaling vectors λ_A,e (length r, scales the rank directions) and λ_B,e (length
               out, scales the output channels).  λ_B on the outputs rather than on r keeps the
               two vectors from collapsing into one product; both start at 1.
Router (E > 1): linear, no bias, on x → softmax → top-k → weights renormalised to sum to 1.
A starts kaiming-uniform (or Gaussian, std 1/r, as HILO), B at zero: an untrained adapter
leaves the model's output unchanged.

LoRA experts are dispatched one of two ways, with the same result and gradients:
* dense: every expert's A on every token as one (E·r × in) matmul, the hidden units scaled by the
  routing weights (zero for unchosen experts), then one (out × E·r) matmul — two kernels, E/k times
  the adapter FLOPs of top-k; used while E·r ≤ ``DENSE_DISPATCH_MAX_WIDTH`` (the common case: 2–8
  experts of rank 4–16), where the adapter FLOPs are small beside the base layer's and per-expert
  gathers would dominate (benchmarks/RESULTS.md §4);
* sparse: per expert, only the tokens routed to it (gather, two matmuls, index_add) — the cost grows
  with top-k, not with E, which pays for many or wide experts.
MoR experts are evaluated per routing slot on the shared A, B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DENSE_DISPATCH_MAX_WIDTH = 256  # E·r up to which computing every expert beats gathering tokens per expert


class RoutingContext:
    """Shared by the wrapped modules of one model: the current batch's token mask."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None

    def valid_tokens(self, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        mask = self.attention_mask
        if mask is None or tuple(mask.shape) != tuple(leading_shape):
            return None
        return mask.reshape(-1).to(device=device, dtype=torch.bool)


class MoELoraLinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, *, experts: int, rank: int,
                 top_k: int, lora_alpha: float, dropout: float = 0.0, init: str = "kaiming-uniform",
                 expert_type: str = "lora", context: RoutingContext | None = None):
        super().__init__()
        if experts < 1 or rank < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"bad adapter shape: experts={experts}, rank={rank}, top_k={top_k}")
        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.experts, self.rank, self.top_k = experts, rank, top_k
        self.expert_type = expert_type
        self.scaling = lora_alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.context = context or RoutingContext()
        weight = next(base.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        if expert_type == "lora":
            self.lora_A = nn.Parameter(torch.empty(experts, rank, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, **factory))
        elif expert_type == "mor":
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
            self.lambda_A = nn.Parameter(torch.ones(experts, rank, **factory))
            self.lambda_B = nn.Parameter(torch.ones(experts, out_features, **factory))
        else:
            raise ValueError(f"expert_type {expert_type!r}: expected lora or mor")
        self._init_A(init)
        self.router = nn.Linear(in_features, experts, bias=False, **factory) if experts > 1 else None
        # On the base's device: a plan applied to a model already on the GPU must not leave this on the CPU.
        self.register_buffer("expert_load", torch.zeros(experts, dtype=torch.float64, device=weight.device),
                             persistent=False)
        self.last_aux_loss: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight: models read ``.weight.dtype`` of their projections (T5, BART)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def _init_A(self, init: str) -> None:
        slices = self.lora_A if self.lora_A.dim() == 3 else [self.lora_A]
        with torch.no_grad():
            for a in slices:
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / self.rank)
                elif init == "kaiming-uniform":
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                else:
                    raise ValueError(f"init {init!r}: expected kaiming-uniform or gaussian")

    # ---- accounting from the live parameters
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def active_parameters(self) -> int:
        router = self.router.weight.numel() if self.router is not None else 0
        if self.expert_type == "lora":
            per_expert = self.lora_A[0].numel() + self.lora_B[0].numel()
            return self.top_k * per_expert + router
        per_expert = self.lambda_A[0].numel() + self.lambda_B[0].numel()
        return self.lora_A.numel() + self.lora_B.numel() + self.top_k * per_expert + router

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        tokens = x.reshape(-1, self.in_features)
        dropped = self.dropout(tokens).to(self.lora_A.dtype)
        weights, chosen = self._route(tokens, x.shape[:-1])
        if self.expert_type == "lora":
            delta = self._lora_experts(dropped, weights, chosen)
        else:
            delta = self._mor_experts(dropped, weights, chosen)
        return result + (delta * self.scaling).to(result.dtype).reshape(*x.shape[:-1], self.out_features)

    def _route(self, tokens: torch.Tensor, leading_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[0]
        if self.router is None:
            ones = torch.ones(n, 1, device=tokens.device, dtype=self.lora_A.dtype)
            return ones, torch.zeros(n, 1, dtype=torch.long, device=tokens.device)
        probs = F.softmax(self.router(tokens.to(self.router.weight.dtype)).float(), dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        weights = (top / top.sum(dim=-1, keepdim=True)).to(self.lora_A.dtype)
        valid = self.context.valid_tokens(leading_shape, tokens.device)
        self._record(probs, chosen, valid)
        return weights, chosen

    def _record(self, probs: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Router statistics and the Mixtral load-balancing term E · Σ_e f_e · P_e (valid tokens)."""
        if valid is not None:
            probs, chosen = probs[valid], chosen[valid]
        if probs.shape[0] == 0:
            self.last_aux_loss = None
            return
        one_hot = F.one_hot(chosen, self.experts).float()  # (tokens, k, E)
        with torch.no_grad():
            self.expert_load += one_hot.sum(dim=(0, 1)).double()
        tokens_per_expert = one_hot.mean(dim=0)  # (k, E): per routing slot, as the reference
        router_prob_per_expert = probs.mean(dim=0)  # (E,)
        self.last_aux_loss = self.experts * torch.sum(tokens_per_expert * router_prob_per_expert[None, :])

    def _lora_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if self.experts == 1:
            return (x @ self.lora_A[0].T) @ self.lora_B[0].T
        if self.experts * self.rank <= DENSE_DISPATCH_MAX_WIDTH:
            return self._dense_dispatch(x, weights, chosen)
        return self._sparse_dispatch(x, weights, chosen)

    def _dense_dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        gates = x.new_zeros(x.shape[0], self.experts).scatter(1, chosen, weights)  # (tokens, E), zero if unchosen
        hidden = (x @ self.lora_A.reshape(-1, self.in_features).T).view(-1, self.experts, self.rank)
        hidden = (hidden * gates[:, :, None]).reshape(-1, self.experts * self.rank)
        return hidden @ self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1).T

    def _sparse_dispatch(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        delta = x.new_zeros(x.shape[0], self.out_features)
        for expert in range(self.experts):  # a loop over experts, each on its own tokens
            rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
            if rows.numel() == 0:
                continue
            hidden = x[rows] @ self.lora_A[expert].T
            out = (hidden @ self.lora_B[expert].T) * weights[rows, slot, None]
            delta.index_add_(0, rows, out)
        return delta

    def _mor_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        shared = x @ self.lora_A.T  # (tokens, r), computed once for every expert
        delta = x.new_zeros(x.shape[0], self.out_features)
        for slot in range(chosen.shape[1]):  # top-k routing slots
            expert = chosen[:, slot]
            scaled = (shared * self.lambda_A[expert]) @ self.lora_B.T
            delta = delta + weights[:, slot, None] * self.lambda_B[expert] * scaled
        return delta

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.experts}, rank={self.rank}, "
                f"top_k={self.top_k}, type={self.expert_type}, scaling={self.scaling:g}")
