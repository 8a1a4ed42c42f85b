"""The text trainers' loss terms as pure functions (nnU-Net's own Dice+CE stays the segmentation loss):
BiCLIP's cycle, IAC consistency and generation losses, and MedCLIPSeg's soft contrastive loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cycle_loss(t: torch.Tensor, t_hat: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """‖t − t̂‖², averaged over batch and dimensions (0 iff identical).

    ``normalized``: both (B, D) vectors are layer-normalised first (zero mean, unit variance over D, no
    learned scale), so the loss compares their patterns, not their sizes. The raw form grows with ‖t‖, which
    nothing bounds (t is the cycle's detached target); measured on development data, its gradient through the
    pseudo-image then outweighs the generation loss and the text pathway stops learning where reports put
    lesions."""
    if normalized:
        t, t_hat = F.layer_norm(t, t.shape[-1:]), F.layer_norm(t_hat, t_hat.shape[-1:])
    return F.mse_loss(t_hat, t)


def consistency_loss(p_weak: torch.Tensor, p_strong: torch.Tensor) -> torch.Tensor:
    """IAC: 1 − cos(p_w, p_s), averaged over the batch (0 for identical directions)."""
    return (1 - F.cosine_similarity(p_weak, p_strong, dim=1, eps=1e-6)).mean()


def generation_loss(pseudo: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L1 between the pseudo-image and its reference (EF-UNet's: the image masked by the lesion)."""
    return F.l1_loss(pseudo, reference)


def blur_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) mask -> Gaussian-blurred (σ in pixels), rescaled so each sample's maximum stays at its
    mask's maximum: a zone-scale soft target ("the lesion is around here")."""
    if sigma <= 0:
        return mask
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=mask.dtype, device=mask.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = F.conv2d(F.pad(mask, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    peak = out.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (out / peak * mask.amax(dim=(2, 3), keepdim=True)).clamp(0, 1)


def lesion_generation_loss(logits: torch.Tensor, lesion: torch.Tensor, weight: torch.Tensor,
                           smooth: float = 1.0) -> torch.Tensor:
    """BCE + soft Dice of the pseudo-image (logits, (B, 1, H, W)) against the lesion mask (or a soft, blurred
    version of it), over pixels with
    ``weight`` > 0 (inside the image, not nnU-Net's ignore label).

    Why not L1 to ``image × mask``: L1 is minimised by the per-pixel conditional *median*, which is ~0
    wherever fewer than half of the cases with that report have a lesion — nearly everywhere — so the
    pseudo-image learns to be empty. BCE is minimised by the conditional *mean* p(lesion | report,
    position), a map of where the report says the lesion is; the Dice term keeps small lesions from
    being swamped by background. Dice is computed over the batch (empty masks do not give 0/0)."""
    lesion, weight = lesion.to(logits.dtype), weight.to(logits.dtype)
    bce = (F.binary_cross_entropy_with_logits(logits, lesion, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
    p = torch.sigmoid(logits) * weight
    dice = 1 - (2 * (p * lesion).sum() + smooth) / (p.sum() + (lesion * weight).sum() + smooth)
    return bce + dice


def soft_contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, tau: float = 0.2,
                          target_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-target CLIP loss.

    img_emb (B, E), txt_emb (B, E): L2-normalised here; logits ``img·txtᵀ/τ``. Soft targets
    ``softmax(cos(r_i, r_j)/τ)`` over the batch from ``target_emb`` (B, D) (default ``txt_emb``),
    without gradient. Loss = mean of the image->text and text->image soft cross-entropies.

    With mutually very different reports the targets are one-hot and this is InfoNCE; identical
    reports give identical target rows (no false negatives). The reference implementation
    additionally divides the similarity rows by their norm before the softmax; this follows the paper.
    """
    img = F.normalize(img_emb, dim=-1)
    txt = F.normalize(txt_emb, dim=-1)
    logits = img @ txt.t() / tau  # (B, B), row i: image i vs all texts
    with torch.no_grad():
        r = F.normalize((txt_emb if target_emb is None else target_emb).detach().to(logits.dtype), dim=-1)
        targets = torch.softmax(r @ r.t() / tau, dim=-1)
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(targets.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2
