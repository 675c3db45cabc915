"""Attention, transformer blocks, attention capture and head silencing.

One :class:`Attention` module serves self- and cross-attention (timm's ``Attention`` habit). By default
it runs ``F.scaled_dot_product_attention`` (the fused kernel, no attention matrix kept). Only while a
:func:`capture_attention` context is active does it take the explicit ``softmax(q k^T / sqrt(d)) v``
path and record the weights, so capture costs nothing when nobody asks for it. Tests assert both paths
agree to 1e-5, with key padding masks.

Names: every attention module gets a ``name`` of the form ``<module>.<layer>`` (``f.0``, ``g.1``,
``head.image/digit.0``, ``A.0``...) when its owner is built. The name is what :func:`silence_heads`
targets; the capture key is the name, or a caller-given ``tag`` (``A.i<-j``), plus ``[i]``/``[j]``
when a per-stream module runs inside a two-stream forward (see ``Recorder.scope``).

Capture and silencing are **per thread**: the contexts register their recorder and head gates in a
``threading.local`` keyed by module identity, not on the modules, so one shared model can serve
concurrent requests (the Gradio app's worker threads) where one request probes heads and another
predicts normally.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import ConfigError

_local = threading.local()  # .recorders {id(module): Recorder}, .gates {id(Attention): (heads,) tensor}


def _registry(name: str) -> dict:
    reg = getattr(_local, name, None)
    if reg is None:
        reg = {}
        setattr(_local, name, reg)
    return reg


def active_recorder(module: nn.Module) -> Recorder | None:
    """The recorder capturing ``module`` in this thread, if any."""
    return _registry("recorders").get(id(module))


class Recorder:
    """Where an active capture writes: attention weights and, optionally, per-head outputs."""

    def __init__(self, outputs: bool = False):
        self.maps = CapturedAttention()
        self.outputs = outputs
        self.scope: str | None = None  # "i" / "j" while a per-stream module runs in a two-stream forward

    def key(self, name: str) -> str:
        return f"{name}[{self.scope}]" if self.scope else name


class CapturedAttention(dict):
    """``{key: (B, heads, Q, K) attention weights}``; ``.outputs`` holds ``{key: (B, heads, Q, head_dim)}``
    per-head attention outputs (before the output projection, after silencing) when requested."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, Tensor] = {}


def init_linear(m: nn.Module, scheme: str = "trunc_normal") -> None:
    """``model.init`` for one Linear (zero bias): ``trunc_normal`` (std 0.02, timm's ViT; tuned at width
    768) or ``xavier`` (uniform, the JAX ViT's and MAE's), which keeps narrow layers on their input's
    scale. Measured (one seed each), one image/digit head trained alone for 300 updates of 64: test
    accuracy 33% with trunc_normal vs 66% with xavier on ``tiny`` (lr 2e-3; a plain 1-block ViT of the
    same width: 61%), 50% vs 71% on ``small`` (lr 3e-4). But the full two-stream stage 3 on ``tiny``
    (600 updates, lr 2e-3, quarter data) did worse with xavier (audio/digit 10% vs 28%, image/digit 23%
    both), so the default stays trunc_normal until a multi-seed study of the stages settles it."""
    if scheme == "xavier":
        nn.init.xavier_uniform_(m.weight)
    else:
        nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head attention; ``context`` given -> cross-attention (queries from ``x``, keys/values from
    ``context``, whose width ``kv_dim`` may differ: the K/V projections map it to ``dim``)."""

    def __init__(
        self, dim: int, heads: int, kv_dim: int | None = None, cross: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        assert dim % heads == 0, "width must split evenly over heads"
        self.heads, self.head_dim, self.cross, self.dropout = heads, dim // heads, cross, dropout
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.name = ""  # set by the owner: "<module>.<layer>"

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        tag: str | None = None,
    ) -> Tensor:
        """x (B, Q, dim); context (B, K, kv_dim) if cross; key_padding_mask (B, K) True = ignore."""
        B, Q, C = x.shape
        h, hd = self.heads, self.head_dim
        if self.cross:
            assert context is not None, "cross-attention needs a context"
            K = context.shape[1]
            q = self.q(x).view(B, Q, h, hd).transpose(1, 2)  # (B, h, Q, hd)
            k, v = self.kv(context).view(B, K, 2, h, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, h, K, hd)
        else:
            K = Q
            q, k, v = self.qkv(x).view(B, Q, 3, h, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, h, Q, hd)
        allowed = None if key_padding_mask is None else ~key_padding_mask.view(B, 1, 1, K)  # True = attend
        p = self.dropout if self.training else 0.0
        rec = active_recorder(self)
        if rec is None:  # fast path: fused kernel, no weights materialised
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, h, Q, hd)
        else:  # explicit path, only while capturing
            att = (q @ k.transpose(-2, -1)) * hd**-0.5  # (B, h, Q, K)
            if allowed is not None:
                att = att.masked_fill(~allowed, float("-inf"))
            att = att.softmax(dim=-1)
            rec.maps[rec.key(tag or self.name)] = att.detach()
            y = F.dropout(att, p) @ v  # (B, h, Q, hd)
        gate = _registry("gates").get(id(self))  # (heads,) 1 keep / 0 silence, set by silence_heads()
        if gate is not None:
            y = y * gate.to(y.dtype).view(1, h, 1, 1)
        if rec is not None and rec.outputs:
            rec.maps.outputs[rec.key(tag or self.name)] = y.detach()
        y = y.transpose(1, 2).reshape(B, Q, C)  # (B, Q, dim): heads side by side
        return self.proj_drop(self.proj(y))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (BERT/ViT): x + attn(LN(x)), then x + MLP(LN(x)) with GELU.

    :func:`workbench.model.moe.apply_moe` may swap the dense MLP for top-k routed experts (IMP) and set
    ``moe``; those also receive the padding mask (padding tokens are not routed).
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout=dropout)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, mlp_ratio, dropout)
        self.drop_path = DropPath(drop_path)
        self.moe = False  # set by workbench.model.moe.apply_moe with the experts
        self.mlp_shape = (dim, mlp_ratio, dropout)  # what a mixture of experts in its place must match

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_padding_mask=padding))
        if self.moe:
            return x + self.drop_path(self.mlp(self.norm2(x), padding))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """``depth`` blocks and a final LayerNorm. Attention modules are named ``<name>.<layer>``."""

    def __init__(
        self,
        name: str,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth decay
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.name = name
        for i, block in enumerate(self.blocks):
            block.attn.name = f"{name}.{i}"

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x)


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: ``x + attn(LN(x), LN(context))`` (one fusion step of A)."""

    def __init__(self, name: str, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(kv_dim or dim)
        self.attn = Attention(dim, heads, kv_dim=kv_dim, cross=True, dropout=dropout)
        self.attn.name = name

    def forward(
        self, x: Tensor, context: Tensor, context_padding: Tensor | None = None, tag: str | None = None
    ):
        """x (B, Q, dim), context (B, K, kv_dim) -> (B, Q, dim)."""
        return x + self.attn(self.norm_q(x), self.norm_kv(context), context_padding, tag=tag)


# ------------------------------------------------------------------------------ capture and silencing
def attention_modules(module: nn.Module) -> dict[str, Attention]:
    """Every named attention module under ``module``, by name (``f.0``, ``A.1``, ...)."""
    return {m.name: m for m in module.modules() if isinstance(m, Attention) and m.name}


@contextmanager
def capture_attention(module: nn.Module, outputs: bool = False) -> Iterator[CapturedAttention]:
    """Record every attention map computed under ``module`` while the context is open.

    Yields a dict ``{key: (B, heads, queries, keys)}`` filled as forwards run; with ``outputs=True``
    its ``.outputs`` also holds each module's per-head outputs ``(B, heads, queries, head_dim)``.
    """
    recorder = Recorder(outputs)
    registry = _registry("recorders")
    ids = [id(module)] + [id(m) for m in module.modules() if isinstance(m, Attention)]
    previous = {i: registry.get(i) for i in ids}  # nested captures restore the outer one
    registry.update(dict.fromkeys(ids, recorder))
    try:
        yield recorder.maps
    finally:
        for i, rec in previous.items():
            if rec is None:
                registry.pop(i, None)
            else:
                registry[i] = rec


@contextmanager
def silence_heads(module: nn.Module, targets: Iterable[tuple[str, int, int]]) -> Iterator[None]:
    """Zero the output of each ``(module, layer, head)`` (e.g. ``("f", 0, 1)``) while the context is open.

    The head's attention output is multiplied by 0 before the heads are merged and projected, so the
    other heads of that layer and every earlier layer are untouched. Unknown targets raise ConfigError.
    """
    mods = attention_modules(module)
    gates: dict[str, Tensor] = {}
    for target in targets:
        try:
            owner, layer, head = target
            name = f"{owner}.{int(layer)}"
        except (TypeError, ValueError):
            raise ConfigError(
                f"head {target!r} is not a (module, layer, head) triple such as ('f', 0, 1)"
            ) from None
        if name not in mods:
            owners = sorted({n.rsplit(".", 1)[0] for n in mods})
            raise ConfigError(f"no attention layer {name!r}; modules are {owners} with layers counted from 0")
        m = mods[name]
        if not 0 <= int(head) < m.heads:
            raise ConfigError(f"{name} has {m.heads} heads; head {head} does not exist (count from 0)")
        gate = gates.setdefault(name, torch.ones(m.heads, device=m.proj.weight.device))
        gate[int(head)] = 0.0
    registry = _registry("gates")
    previous = {id(mods[name]): registry.get(id(mods[name])) for name in gates}
    for name, gate in gates.items():
        old = registry.get(id(mods[name]))
        registry[id(mods[name])] = gate if old is None else gate * old  # nested contexts combine
    try:
        yield
    finally:
        for i, old in previous.items():
            if old is None:
                registry.pop(i, None)
            else:
                registry[i] = old
