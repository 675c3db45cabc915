"""Mixture-of-experts feed-forward layers (IMP, Akbari et al. 2023; Switch Transformer / GShard routing).

One MoE layer replaces the dense GELU MLP of a transformer block (``model.moe_experts`` experts, each
an MLP of the same shape as the dense one)::

    router    p = softmax(x W_r)                          (T, E)   T valid tokens, E experts
    top-k     gates, experts = topk(p, k); gates /= sum   (T, k)   renormalised (GShard, Mixtral)
    experts   y_t = sum_{e in top-k(t)} gate_{t,e} FFN_e(x_t)
    aux loss  E * sum_e f_e * P_e                                  Switch Transformer eq. 4

with ``f_e`` the share of the T*k token-to-expert assignments that go to expert e and ``P_e`` the mean
router probability of e: the loss is 1 when routing is balanced (or the router is uniform) and grows to
E when every token goes to one expert with certainty. Only ``P`` carries gradient (``f`` is a count).

Dispatch is *dropless* (no capacity factor, so no token is ever skipped and the output does not depend
on the batch): the T*k assignments are sorted by expert, each expert runs one matmul on the tokens it
was given (gathered), and ``index_add_`` scatters the gated outputs back. That is E Python iterations
per layer, never one per token. Padding tokens are not routed: their feed-forward output is 0 and they
count neither in the load nor in the auxiliary loss.

Which blocks: every ``model.moe_every``-th block of the f+g stack, counted from 1 across f and then g
(:func:`moe_layers`; V-MoE's "every other layer" with the default 2). With the `tiny` preset (one block
in f, one in g) that is g's block; with `small`/`imp` (4 + 2 blocks) f.1, f.3 and g.1.

Bookkeeping for the objectives and reports:

* :func:`collect_aux` sums, over MoE layers, the mean auxiliary loss of the training forwards since the
  last call (f runs twice in a two-stream forward) and clears it; the stage objectives add it to their
  loss as ``moe_aux`` times ``model.moe_aux_weight``. Nothing is recorded in eval mode or under no_grad.
* :func:`expert_loads` gives every MoE layer's share of assignments per expert in its last forward;
  ``layer.last_counts`` holds the raw counts, so a caller can sum them over batches (e.g. per modality).

Wiring: ``OmniVec2.__init__`` calls :func:`apply_moe` (idempotent; a no-op for dense configs) once its
blocks are built, so every constructor and ``OmniVec2.from_pretrained`` give MoE networks their experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workbench.model.attention import Mlp, Transformer, init_linear


def load_balancing_loss(probs: Tensor, chosen: Tensor, experts: int) -> Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e``.

    probs (T, E) router probabilities; chosen (T, k) the experts each token was sent to. ``f_e`` is the
    share of the T*k assignments that went to e, ``P_e`` the mean probability of e. 1 for balanced
    routing or a uniform router, E when every token goes to one expert with probability 1.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0  # no valid token: nothing to balance (keeps the graph connected)
    f = torch.bincount(chosen.reshape(-1), minlength=experts).to(probs.dtype) / chosen.numel()  # (E,)
    P = probs.mean(0)  # (E,)
    return experts * (f * P).sum()


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits (T, E) -> probabilities (T, E), renormalised top-k gates (T, k), chosen experts (T, k)."""
    probs = logits.float().softmax(dim=-1)
    gates, chosen = probs.topk(top_k, dim=-1)  # (T, k) each, largest first
    return probs, gates / gates.sum(dim=-1, keepdim=True), chosen


class MoEFeedForward(nn.Module):
    """Top-k routed experts in place of a block's dense MLP; ``forward(x (B, N, D), padding (B, N))``."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        experts: int,
        top_k: int,
        dropout: float = 0.0,
        init: str = "trunc_normal",
    ):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be in [1, experts={experts}]")
        self.num_experts, self.top_k = experts, top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, mlp_ratio, dropout) for _ in range(experts))
        self.name = ""  # "<transformer>.<block>", set by apply_moe
        self.last_counts: Tensor | None = None  # (E,) assignments per expert in the last forward
        self._aux: list[Tensor] = []  # auxiliary losses of training forwards since the last collect_aux
        self.reset_parameters(init)

    def reset_parameters(self, scheme: str = "trunc_normal") -> None:
        """Experts get the network's Linear init (``model.init``); the router a small truncated normal
        (std 0.02), so routing starts near uniform and load balancing has something to shape."""
        for m in self.modules():  # router first, then the experts
            if m is self.router:
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Linear):
                init_linear(m, scheme)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        flat = x.reshape(B * N, D)
        keep = None if padding is None else ~padding.reshape(B * N)  # True = a real token
        tokens = flat if keep is None else flat[keep]  # (T, D)
        T, E, k = tokens.shape[0], self.num_experts, self.top_k
        probs, gates, chosen = route(self.router(tokens), k)  # (T, E), (T, k), (T, k)

        expert_of = chosen.reshape(-1)  # (T*k,) assignment -> expert
        token_of = torch.arange(T, device=x.device).repeat_interleave(k)  # (T*k,) assignment -> token
        order = torch.argsort(expert_of, stable=True)  # assignments grouped by expert
        counts = torch.bincount(expert_of, minlength=E)  # (E,)
        per_expert = counts.tolist()
        out = torch.zeros_like(tokens)  # (T, D)
        for e, (idx, gate) in enumerate(
            zip(token_of[order].split(per_expert), gates.reshape(-1)[order].split(per_expert))
        ):
            if idx.numel():
                y = self.experts[e](tokens.index_select(0, idx))  # (n_e, D): one matmul per expert
                # summed in the stream's dtype: under bf16 autocast an expert's Linear returns bf16 while
                # the residual stream (and so ``out``) stays fp32
                out.index_add_(0, idx, y.to(out.dtype) * gate.unsqueeze(-1).to(out.dtype))

        self.last_counts = counts.detach()
        if self.training and torch.is_grad_enabled():
            self._aux.append(load_balancing_loss(probs, chosen, E))
        if keep is None:
            return out.view(B, N, D)
        full = flat.new_zeros(B * N, D)
        full[keep] = out
        return full.view(B, N, D)  # padding tokens: 0 (the residual keeps them unchanged)


# ------------------------------------------------------------------------------------------ wiring
def moe_layers(model_cfg) -> dict[str, list[int]]:
    """``{"f": [...], "g": [...]}``: the MoE blocks of f and g (every ``moe_every``-th of the f+g stack,
    counted from 1 across f then g); empty lists when ``moe_experts`` is 0."""
    if not model_cfg.moe_experts:
        return {"f": [], "g": []}
    every, depth_f = model_cfg.moe_every, model_cfg.depth_f
    stack = [("f", i) for i in range(depth_f)] + [("g", i) for i in range(model_cfg.depth_g)]
    out: dict[str, list[int]] = {"f": [], "g": []}
    for n, (owner, i) in enumerate(stack, start=1):
        if n % every == 0:
            out[owner].append(i)
    return out


def apply_moe(model: nn.Module) -> list[str]:
    """Give ``model`` (an OmniVec2) the MoE blocks ``model.config.model`` asks for; return their names.

    Idempotent, and a no-op for dense configs (no parameter, no RNG draw). Blocks already MoE are kept.
    """
    cfg = model.config.model
    layers = moe_layers(cfg)
    names: list[str] = []
    for module in model.modules():
        if not isinstance(module, Transformer):
            continue
        for i in layers.get(module.name, []):
            block, name = module.blocks[i], f"{module.name}.{i}"
            if not block.moe:
                dim, ratio, dropout = block.mlp_shape
                block.mlp = MoEFeedForward(dim, ratio, cfg.moe_experts, cfg.moe_top_k, dropout, cfg.init)
                block.mlp.name, block.moe = name, True
            names.append(name)
    return names


def moe_modules(model: nn.Module) -> dict[str, MoEFeedForward]:
    """Every MoE layer under ``model`` by name (``f.1``, ``g.0``...), in network order."""
    return {m.name: m for m in model.modules() if isinstance(m, MoEFeedForward)}


def collect_aux(model: nn.Module) -> Tensor:
    """Sum over MoE layers of the mean auxiliary loss recorded since the last call; clears the records.

    0 (a tensor) when nothing was recorded (a dense model, or only eval/no-grad forwards).
    """
    total: Tensor | None = None
    for m in moe_modules(model).values():
        if m._aux:
            term = torch.stack(m._aux).mean()
            total = term if total is None else total + term
            m._aux = []
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def expert_loads(model: nn.Module) -> dict[str, Tensor]:
    """``{layer: (E,) share of token assignments per expert}`` of each MoE layer's last forward."""
    out = {}
    for name, m in moe_modules(model).items():
        if m.last_counts is not None:
            out[name] = m.last_counts.float() / m.last_counts.sum().clamp(min=1)
    return out


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: the total minus the experts it is not routed to (E - k per MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    for m in moe_modules(model).values():
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        total -= (m.num_experts - m.top_k) * per_expert
    return total


__all__ = [
    "MoEFeedForward",
    "active_parameters",
    "apply_moe",
    "collect_aux",
    "expert_loads",
    "load_balancing_loss",
    "moe_layers",
    "moe_modules",
    "route",
]
