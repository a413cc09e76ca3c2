"""A small LLaMA-style decoder in plain PyTorch: RMSNorm, rotary attention, SwiGLU MLP.

Parameter names follow LLaMA/HF (``layers.<i>.attn.q_proj.weight``, ``layers.<i>.mlp.gate_proj.weight``,
``embed.weight``, ``lm_head.weight``), so GaLore's usual target modules (``attn``, ``mlp``) select the
attention and MLP linears. Built on the meta device, it also gives the exact parameter shapes of the
GaLore paper's LLaMA configurations for the memory table (bench/memory_table.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 256  # byte-level
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: Optional[int] = None  # None: LLaMA's rule, 2/3 * 4 * dim rounded up to a multiple of 32
    tie_embeddings: bool = False  # GaLore's LLaMA configs are untied
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim={self.dim} must split into {self.n_heads} heads of even size")
        if self.ffn_dim is None:
            self.ffn_dim = -(-(8 * self.dim // 3) // 32) * 32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (as LLaMA does) so bf16 activations keep a stable norm.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's features by position-dependent angles."""
    t = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)  # (seq, head_dim / 2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        b, s, d = x.shape

        def heads(t):
            return t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)

        q = rotary(heads(self.q_proj(x)), self.inv_freq)
        k = rotary(heads(self.k_proj(x)), self.inv_freq)
        y = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        for module in self.modules():  # HF LLaMA's init: N(0, 0.02) for linears and embeddings
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# The attention and MLP linears: projected in the demo and the memory table, as in GaLore's scripts.
GALORE_TARGETS = r".*\.(attn|mlp)\..*"
