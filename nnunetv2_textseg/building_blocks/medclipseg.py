"""MedCLIPSeg building blocks (Koleilat et al. 2026): probabilistic cross-attention, the two-way
image/text layer and the cross-modal adapter (its soft contrastive loss: :mod:`nnunetv2_textseg.losses`;
Monte-Carlo uncertainty: :mod:`nnunetv2_textseg.uncertainty`).

All modules are plain ``nn.Module``s configured by constructor arguments and work for 2D and 3D
feature maps (spatial positions are flattened to tokens). Shapes: B = batch, N = image tokens,
L = text tokens, C / d = token widths, K = classes.

Deviations from the reference implementation (HealthX-Lab/MedCLIPSeg ``trainers/layers.py``), all
so that an adapter inserted into an already planned nnU-Net starts as the identity:

* the attention output is mixed in as ``query + tanh(gate) · attn`` with ``gate`` initialised at 0
  (the reference uses ``sigmoid(gate) · attn + (1 − sigmoid(gate)) · query``, a 50/50 mix at
  init); ``tanh(0) = 0`` makes the module exactly the identity at init while the gate still gets a
  gradient (Flamingo-style gating);
* the query is layer-normalised before its projection (the residual keeps the raw query);
* multi-head (the reference uses one head); the variance penalty is computed per head;
* the MLPs' last layers are zero-initialised and the adapter adds the up-projection of what the
  two-way layer *changed* (``up(v' − v)``), so a fresh adapter leaves the feature map untouched.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProbabilisticCrossAttention(nn.Module):
    """Cross-attention whose keys and values are Gaussians.

    Keys and values each predict a mean (layer-normalised) and a variance ``softplus(·) + eps``.
    Per head (width c)::

        scores = Q·K_μᵀ/√c − β·sqrt((Q ⊙ Q)·K_varᵀ / c)     # uncertain keys are attended less
        V      = V_μ + sqrt(V_var)·ε,  ε ~ N(0, I)          # if sample, else V = V_μ
        out    = query + tanh(gate)·W_o(softmax(scores)·V)

    Args:
        dim: token width C of query and context (must be divisible by ``heads``).
        heads: attention heads.
        beta: weight β of the key-uncertainty penalty (2.35 in the paper).
        deterministic: plain attention with K_μ, V_μ only (the ``_noProb`` ablation; no variance heads
            are built).
        gate_init: initial value of the gate parameter; 0 makes the module the identity at init.
        eps: variance floor.

    ``key_mask`` (B, Lk) bool, True = real token: masked keys get −inf scores. A row without any
    real key returns its query unchanged.
    """

    def __init__(self, dim: int, heads: int = 4, beta: float = 2.35, deterministic: bool = False,
                 gate_init: float = 0.0, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.beta, self.eps = dim, heads, float(beta), float(eps)
        self.deterministic = deterministic
        self.q_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_mu = nn.Linear(dim, dim)
        self.v_mu = nn.Linear(dim, dim)
        self.k_norm = nn.LayerNorm(dim)
        self.v_norm = nn.LayerNorm(dim)
        if not deterministic:
            self.k_var = nn.Linear(dim, dim)
            self.v_var = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, h, L, c)"""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None,
                sample: bool = False) -> torch.Tensor:
        """query (B, Lq, C), context (B, Lk, C), key_mask (B, Lk) bool -> (B, Lq, C)"""
        b, lq, c = query.shape
        ch = c // self.heads
        q = self._heads(self.q_proj(self.q_norm(query)))
        k_mu = self._heads(self.k_norm(self.k_mu(context)))
        v = self._heads(self.v_norm(self.v_mu(context)))
        scores = q @ k_mu.transpose(-1, -2) / math.sqrt(ch)  # (B, h, Lq, Lk)
        if not self.deterministic:
            k_var = self._heads(F.softplus(self.k_var(context)) + self.eps)
            # in float32: under fp16 autocast the clamp would round to 0 and sqrt's gradient blow up
            penalty = (q.float().pow(2) @ k_var.float().transpose(-1, -2)) / ch
            scores = scores - (self.beta * penalty.clamp_min(1e-12).sqrt()).to(scores.dtype)
            if sample:
                v_var = self._heads(F.softplus(self.v_var(context)) + self.eps)
                v = v + v_var.sqrt() * torch.randn_like(v_var)
            elif torch.is_grad_enabled():
                # mean path while training: keep the value-variance head in the graph (DDP with
                # find_unused_parameters=False needs a gradient for every parameter)
                v = v + 0 * self.v_var(context).sum()
        has_key = None
        if key_mask is not None:
            key_mask = key_mask.to(torch.bool)
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            has_key = key_mask.any(dim=-1)
            # rows without a single real key: uniform weights (finite), output zeroed below
            scores = torch.where(has_key[:, None, None, None], scores, torch.zeros_like(scores))
        attn = torch.softmax(scores, dim=-1)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(b, lq, c))
        if has_key is not None:
            out = out * has_key[:, None, None].to(out.dtype)
        return query + torch.tanh(self.gate) * out


def _mlp(dim: int, ratio: int = 2) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class TwoWayLayer(nn.Module):
    """Image tokens attend to text, then text tokens attend to the updated image tokens.

    Each direction: probabilistic cross-attention (gated residual), then ``x + MLP(LayerNorm(x))``
    with a zero-initialised last MLP layer, so the layer is the identity at init.
    """

    def __init__(self, dim: int, heads: int = 4, beta: float = 2.35, deterministic: bool = False,
                 gate_init: float = 0.0, mlp_ratio: int = 2):
        super().__init__()
        self.img_attn = ProbabilisticCrossAttention(dim, heads, beta, deterministic, gate_init)
        self.img_norm = nn.LayerNorm(dim)
        self.img_mlp = _mlp(dim, mlp_ratio)
        self.txt_attn = ProbabilisticCrossAttention(dim, heads, beta, deterministic, gate_init)
        self.txt_norm = nn.LayerNorm(dim)
        self.txt_mlp = _mlp(dim, mlp_ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None = None,
                sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, d), txt (B, L, d), txt_mask (B, L) bool (True = real) -> (img', txt')"""
        img = self.img_attn(img, txt, key_mask=txt_mask, sample=sample)
        img = img + self.img_mlp(self.img_norm(img))
        txt = self.txt_attn(txt, img, key_mask=None, sample=sample)
        txt = txt + self.txt_mlp(self.txt_norm(txt))
        return img, txt


class CrossModalAdapter(nn.Module):
    """MedCLIPSeg's PVL adapter on a U-Net feature map.

    Down-projects image tokens (C_img -> d) and text tokens (D_text -> d), applies a
    :class:`TwoWayLayer` and adds the up-projection (d -> C_img) of the image tokens' change back to
    the feature map. Returns the updated feature map and the text tokens in width d (the next
    adapter's text input).
    """

    def __init__(self, image_channels: int, text_dim: int, width: int = 64, heads: int = 4, beta: float = 2.35,
                 deterministic: bool = False, gate_init: float = 0.0, position_dim: int = 0):
        super().__init__()
        self.img_down = nn.Linear(image_channels, width)
        self.txt_down = nn.Linear(text_dim, width)
        # position features (B, position_dim, *spatial) of each image token, added to its down-projection
        self.pos_down = nn.Linear(position_dim, width) if position_dim else None
        self.two_way = TwoWayLayer(width, heads, beta, deterministic, gate_init)
        self.img_up = nn.Linear(width, image_channels, bias=False)  # up(0) = 0: identity at init

    def forward(self, feat: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None = None,
                sample: bool = False, position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feat (B, C_img, *spatial), txt (B, L, D_text), txt_mask (B, L), position (B, position_dim, *spatial)
        (only with ``position_dim``) -> (feat', txt' (B, L, d))"""
        b, c = feat.shape[:2]
        tokens = feat.flatten(2).transpose(1, 2)  # (B, N, C_img)
        v = self.img_down(tokens)
        if self.pos_down is not None:
            if position is None:
                raise ValueError("this adapter was built with position_dim: pass each token's position features")
            # the attention then knows where each token lies (text says "upper left"); the residual below is
            # v_new - v, so the position only steers what the tokens take from the text
            v = v + self.pos_down(position.flatten(2).transpose(1, 2).to(v.dtype))
        v_new, t_new = self.two_way(v, self.txt_down(txt), txt_mask, sample)
        delta = self.img_up(v_new - v).transpose(1, 2).reshape(feat.shape)
        return feat + delta.to(feat.dtype), t_new


def tokens_or_null_report(null: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                          drop: torch.Tensor | None = None, ignore_text: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Report tokens (B, L, D) and mask (B, L) for the adapters, with the learned null report ``null`` (1, 1, D; one
    real token) in the rows that are dropped (``drop`` (B,) bool), have no real token, or in all rows if ``tokens`` is
    None or ``ignore_text``."""
    if tokens is None or ignore_text:
        return null.expand(batch, 1, -1), torch.ones(batch, 1, dtype=torch.bool, device=null.device)
    tokens = tokens.to(device=null.device, dtype=null.dtype)
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=null.device)
    mask = mask.to(device=null.device, dtype=torch.bool)
    tokens = tokens.expand(batch, -1, -1) if tokens.shape[0] == 1 else tokens
    mask = mask.expand(batch, -1) if mask.shape[0] == 1 else mask
    use_null = ~mask.any(1)
    if drop is not None:
        use_null = use_null | drop.to(device=null.device, dtype=torch.bool)
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    # torch.where keeps both branches in the graph: the null report gets a gradient every step
    # (DDP with find_unused_parameters=False requires it), also when no row is dropped.
    tokens = torch.where(use_null[:, None, None], null.expand_as(tokens), tokens)
    mask = torch.where(use_null[:, None], null_mask, mask)
    return tokens, mask


def film_logits(seg: torch.Tensor | list[torch.Tensor], film: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The report's per-class affine on the U-Net's logits, ``logit_k · (1 + γ_k) + δ_k``, on every deep-supervision
    output alike. seg (B, K, *spatial) or a list of them; film (B, 2K) = [γ | δ]."""
    gamma, delta = film.chunk(2, dim=1)  # (B, K) each

    def apply(o: torch.Tensor) -> torch.Tensor:
        shape = o.shape[:2] + (1,) * (o.ndim - 2)
        return o * (1 + gamma.reshape(shape)).to(o.dtype) + delta.reshape(shape).to(o.dtype)

    return [apply(o) for o in seg] if isinstance(seg, (list, tuple)) else apply(seg)


POSITION_FREQUENCIES = (1.0, 2.0, 4.0)
FOURIER_POSITION_FEATURES = 4 * len(POSITION_FREQUENCIES) + 1  # channels of fourier_position_features


def fourier_position_features(position: torch.Tensor) -> torch.Tensor:
    """Patient-frame position channels (B, 3, *spatial) — row and column in [-1, 1] and the inside flag — ->
    (B, FOURIER_POSITION_FEATURES, *spatial): sin and cos of π·f·row and π·f·column for each f of
    POSITION_FREQUENCIES, and the inside flag. Zone-scale places ("upper", "left") are then linear in the features."""
    rows, cols, inside = position[:, 0:1], position[:, 1:2], position[:, 2:3]
    parts = []
    for f in POSITION_FREQUENCIES:
        for coord in (rows, cols):
            parts += [torch.sin(torch.pi * f * coord), torch.cos(torch.pi * f * coord)]
    return torch.cat(parts + [inside], dim=1)
