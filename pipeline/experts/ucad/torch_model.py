"""UCAD's torch parts: prompted knowledge features and the structure-based contrastive loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.features.vit import ViTBackbone


def init_prompts(vit: ViTBackbone, pixels: torch.Tensor, num_layers: int, num_tokens: int, seed: int) -> torch.Tensor:
    """L x N x D deep prompts that start close to neutral: block i's tokens are the mean patch token
    entering block i on the task's images (block 0 takes block 0's output), plus small seeded noise.
    Random tokens, by contrast, are attended to like foreign patches: on magnetic_tile they cost
    0.03 image AUROC before any training."""
    with torch.no_grad():
        outputs = vit.multi_layer_tokens(pixels, range(num_layers))
        means = torch.stack([outputs[max(i - 1, 0)].mean(dim=(0, 1)) for i in range(num_layers)]).cpu()  # L x D
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_layers, num_tokens, means.shape[1], generator=generator) * means.std(dim=1)[:, None, None] * 0.02
    return means[:, None, :] + noise


def knowledge_features(vit: ViTBackbone, pixels: torch.Tensor, layers: Sequence[int], prompts: torch.Tensor | None) -> torch.Tensor:
    """B x rows x cols x (len(layers) * D) locally aware prompted patch features: each layer's tokens averaged
    over their 3 x 3 token neighbourhood (PatchCore's local aggregation), layers concatenated."""
    tokens = vit.multi_layer_tokens(pixels, layers, prompts)
    rows, cols = vit.token_grid(*pixels.shape[-2:])
    maps = []
    for layer in layers:
        t = tokens[layer]  # B x P x D
        grid_map = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], rows, cols)
        maps.append(F.avg_pool2d(grid_map, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1).contiguous()


def structure_contrastive_loss(features: torch.Tensor, regions: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over patches, per image: patches of the same Segment-Anything region
    are positives, patches of other regions negatives (UCAD's structure-based contrastive learning).

    features: B x P x D; regions: B x P int64, 0 = covered by no mask (such patches are left out).
    An anchor counts only with at least one positive and one negative: an image SAM sees as a single
    region has no structure to contrast, and its all-positive loss would only pull every patch
    together (on magnetic_tile that cost 0.14 image AUROC). Returns the mean over anchors (0 if none)."""
    z = F.normalize(features, dim=-1)
    logits = z @ z.transpose(1, 2) / temperature  # B x P x P
    valid = regions > 0
    pair_valid = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(regions.shape[1], dtype=torch.bool, device=regions.device)[None]
    candidates = pair_valid & ~eye
    positives = candidates & (regions[:, :, None] == regions[:, None, :])
    logits = logits.masked_fill(~candidates, -1e9)  # finite: a row with no candidate must not give NaN gradients
    log_prob = logits - torch.logsumexp(logits, dim=2, keepdim=True)
    log_prob = log_prob.masked_fill(~positives, 0.0)
    n_pos = positives.sum(dim=2)
    anchors = (n_pos > 0) & ((candidates & ~positives).sum(dim=2) > 0)
    if not anchors.any():
        return features.sum() * 0.0
    per_anchor = -log_prob.sum(dim=2)[anchors] / n_pos[anchors]
    return per_anchor.mean()
