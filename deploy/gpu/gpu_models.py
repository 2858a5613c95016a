"""The model path of live inspection, self-contained (torch + timm only), for the GPU check.

Why a copy and not `import pipeline`: `pipeline.features.backbone` imports `schemas.spec` (pydantic),
`pipeline.features.vit` the asset registry, and `pipeline.experts.patchcore` faiss; the device machine
has none of pydantic or faiss. Carrying wheels (pydantic, pydantic-core, annotated-types,
typing-extensions, typing-inspection, faiss-cpu) would cost a pip install per run and buy little: the
check replaces faiss's CPU search with a matmul on the GPU anyway, and the weights must travel as files
whatever imports them. So this module rebuilds the same networks the way the pipeline builds them and
mirrors its arithmetic, nothing carried but the prepared folder; `tests/test_gpu_check.py` proves the two
agree (fp32, CPU, to 1e-4; in practice bit for bit) on real images with the pipeline's own weights, and
runs check.py with those packages blocked, so what the device check measures is the real model path:

- routing: `pipeline.features.vit.ViTBackbone.multi_layer_tokens` without prompts: timm's
  `vit_small_patch14_dinov2` at 224 x 224 (ImageNet mean/std), patch tokens at the output of block
  `KEY_LAYER` (no final norm, later blocks never run: the model is built with KEY_LAYER + 1 blocks), and
  `pipeline.core.task_id.KeyTaskIdentifier._exact`: mean over patches of the nearest-key distance;
- PatchCore: `pipeline.features.backbone.Backbone` (timm `tf_efficientnet_lite0`, features_only, out
  indices 1-4, inputs (x - 0.5) / 0.5), `pipeline.experts.patchcore.torch_model.embed_patches` on stages
  (2, 3), `MemoryBank.score` (nearest bank entry, the paper's re-weighted image score over the patches
  that show the frame, bilinear map + Gaussian blur) and `pipeline.features.geometry`'s letterbox and
  stitch, with the resizes done on the tensor (antialiased bilinear, rounded to 8 bits as PIL's uint8
  output is) instead of with PIL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

VIT_TIMM = "vit_small_patch14_dinov2"
CNN_TIMM = "tf_efficientnet_lite0"
VIT_PATCH = 14
KEY_LAYER = 7  # pipeline.features.backbone.KEY_LAYER
CNN_STAGES = (1, 2, 3, 4)  # pipeline.features.backbone.ALL_STAGES: what Backbone computes live
PATCH_STAGES = (2, 3)  # pipeline.features.backbone.PATCH_STAGES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CNN_MEAN = CNN_STD = 0.5
_MAX_SCORES_PER_CHUNK = 1 << 26  # distances held at once in the searches (256 MiB of float32)
_BLOCK = re.compile(r"blocks\.(\d+)\.")
# Both searches run in fp32 with autocast off, whatever the networks use: ||q||^2 + ||b||^2 - 2 q.b cancels,
# and a bf16 (or TF32) product would swamp the small distances of normal patches.


# ------------------------------------------------------------------------------------------ networks
def truncate_vit_state(state: Mapping[str, torch.Tensor], last_block: int = KEY_LAYER) -> dict[str, torch.Tensor]:
    """The tensors of blocks 0..last_block and everything outside the blocks (routing never runs the rest)."""
    out = {}
    for key, value in state.items():
        block = _BLOCK.match(key)
        if block is None or int(block.group(1)) <= last_block:
            out[key] = value
    return out


def _float_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}


class RoutingViT(nn.Module):
    """DINOv2 ViT-S/14 up to block KEY_LAYER: B x 3 x S x S pixels in [0, 1] -> B x P x 384 key tokens."""

    def __init__(self, state: Mapping[str, torch.Tensor], image_size: int = 224):
        super().__init__()
        blocks = {int(m.group(1)) for m in map(_BLOCK.match, state) if m}
        if not blocks or blocks != set(range(max(blocks) + 1)):
            raise ValueError(f"ViT state: blocks {sorted(blocks)} are not 0..n")
        with torch.device("meta"):  # every tensor comes from `state`: skip the random init
            net = timm.create_model(VIT_TIMM, pretrained=False, img_size=image_size, depth=max(blocks) + 1)
        net.load_state_dict(_float_state(state), strict=True, assign=True)
        if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
            raise RuntimeError("ViT: some tensors were not loaded")
        self.net = net
        self.key_layer = min(KEY_LAYER, max(blocks))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.patch_embed((pixels - self.mean) / self.std)
        x = net.norm_pre(net.patch_drop(net._pos_embed(x)))
        for block in net.blocks[: self.key_layer + 1]:
            x = block(x)
        return x[:, 1:]  # drop CLS; no final norm (the pipeline's keys are the block's raw output)


class PatchCNN(nn.Module):
    """EfficientNet-Lite0 feature stages, as `Backbone` runs them: pixels in [0, 1] -> {stage: B x C x h x w}."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__()
        self.net = timm.create_model(CNN_TIMM, pretrained=False, features_only=True, out_indices=CNN_STAGES)
        self.net.load_state_dict(_float_state(state), strict=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        return dict(zip(CNN_STAGES, self.net((pixels - CNN_MEAN) / CNN_STD)))


def embed_patches(stages: Mapping[int, torch.Tensor], which: tuple[int, ...] = PATCH_STAGES) -> torch.Tensor:
    """PatchCore's locally aware patches: 3x3 average of each stage, upsampled to the first stage's grid,
    concatenated. B x h x w x D (torch_model.embed_patches)."""
    maps = [F.avg_pool2d(stages[s], kernel_size=3, stride=1, padding=1) for s in which]
    grid = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------------------ geometry
def squeeze(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B x 3 x H x W -> B x 3 x height x width, aspect ignored (routing's input). Antialiased bilinear."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def to_unit(pixels_255: torch.Tensor) -> torch.Tensor:
    """Resized pixels on the 0-255 scale -> [0, 1], rounded to 8 bits first: the pipeline resizes uint8
    frames with PIL, whose output is uint8 (without the rounding, image scores move by ~1 %, with it ~0.05 %)."""
    return pixels_255.round().clamp_(0.0, 255.0).mul_(1.0 / 255.0)


def letterbox_box(frame_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, new_h, new_w) of a frame letterboxed into the canvas (geometry._letterbox)."""
    h, w = frame_hw
    height, width = canvas_hw
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    return (height - new_h) // 2, (width - new_w) // 2, new_h, new_w


def letterbox(pixels: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """The frames, aspect kept, scaled into the canvas and padded by replicating their edges."""
    top, left, new_h, new_w = letterbox_box(tuple(pixels.shape[-2:]), canvas_hw)
    resized = squeeze(pixels, new_h, new_w)
    height, width = canvas_hw
    pad = (left, width - new_w - left, top, height - new_h - top)
    return F.pad(resized, pad, mode="replicate") if any(pad) else resized


def valid_grid(frame_hw: tuple[int, int], canvas_hw: tuple[int, int], grid_hw: tuple[int, int],
               device: torch.device) -> torch.Tensor:
    """h x w bool: feature cells at least half covered by frame pixels (FeatureBatch.valid_grid)."""
    top, left, new_h, new_w = letterbox_box(frame_hw, canvas_hw)
    if (new_h, new_w) == tuple(canvas_hw):
        return torch.ones(grid_hw, dtype=torch.bool, device=device)
    mask = torch.zeros(1, 1, *canvas_hw, device=device)
    mask[..., top : top + new_h, left : left + new_w] = 1.0
    cells = F.adaptive_avg_pool2d(mask, tuple(grid_hw))[0, 0] >= 0.5
    return cells if cells.any() else torch.ones_like(cells)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of B x H x W maps, radius 4 sigma, reflect padding (torch_model.gaussian_blur)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def canvas_maps(patch_dist: torch.Tensor, canvas_hw: tuple[int, int], sigma: float) -> torch.Tensor:
    """B x h x w patch distances -> B x H x W smoothed canvas maps (torch_model.upsample_maps)."""
    maps = F.interpolate(patch_dist[:, None], size=tuple(canvas_hw), mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


def canvas_to_frames(maps: torch.Tensor, canvas_hw: tuple[int, int], frame_hw: tuple[int, int]) -> torch.Tensor:
    """The part of B x H x W canvas maps that shows the frame, stretched to the frame (geometry.stitch of
    one letterbox view)."""
    top, left, new_h, new_w = letterbox_box(frame_hw, canvas_hw)
    maps = maps[:, top : top + new_h, left : left + new_w]
    if tuple(maps.shape[-2:]) == tuple(frame_hw):
        return maps
    return F.interpolate(maps[:, None], size=tuple(frame_hw), mode="bilinear", align_corners=False)[:, 0]


def patch_maps_to_frames(patch_dist: torch.Tensor, canvas_hw: tuple[int, int], frame_hw: tuple[int, int],
                         sigma: float) -> torch.Tensor:
    """B x h x w patch distances -> B x H x W frame maps."""
    return canvas_to_frames(canvas_maps(patch_dist, canvas_hw, sigma), canvas_hw, frame_hw)


# ------------------------------------------------------------------------------------------ searches
class KeySearch:
    """Exhaustive key search: B x P x D tokens -> B x T mean nearest-key distances (KeyTaskIdentifier)."""

    def __init__(self, keys: torch.Tensor, bounds: torch.Tensor):
        self.keys = keys.float()  # T x K x D (every task has K keys)
        self.key_norms = (self.keys * self.keys).sum(dim=2)  # T x K
        self.bounds = bounds.float()

    def to(self, device: torch.device) -> "KeySearch":
        return KeySearch(self.keys.to(device), self.bounds.to(device))

    def distances(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return self._distances(tokens.float())

    def _distances(self, tokens: torch.Tensor) -> torch.Tensor:
        b, p, d = tokens.shape
        t, k = self.key_norms.shape
        flat_keys = self.keys.reshape(t * k, d)
        chunk = max(1, _MAX_SCORES_PER_CHUNK // max(1, p * t * k))
        out = []
        for start in range(0, b, chunk):
            rows = tokens[start : start + chunk]
            offset = (rows * rows).sum(dim=2, keepdim=True) + self.key_norms.reshape(1, 1, t * k)
            squared = torch.baddbmm(offset, rows, flat_keys.t().expand(len(rows), -1, -1), alpha=-2.0)
            nearest = squared.view(len(rows), p, t, k).amin(dim=3).clamp_min_(0.0).sqrt_()
            out.append(nearest.mean(dim=1))
        return torch.cat(out)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B x T distances, B best task, B its distance, B known: within that task's bound)."""
        distances = self.distances(tokens)
        best_distance, best = distances.min(dim=1)
        return distances, best, best_distance, best_distance <= self.bounds[best]


class BankSearch:
    """PatchCore's memory bank on the device: nearest entry by ||q||^2 + ||b||^2 - 2 q.b (a matmul and a
    top-k per chunk of queries), and each entry's b nearest entries for the re-weighted image score."""

    def __init__(self, bank: torch.Tensor, num_neighbors: int = 3):
        self.bank = bank.float().contiguous()  # M x D
        self.norms = (self.bank * self.bank).sum(dim=1)  # M
        self.num_neighbors = min(num_neighbors, len(self.bank))
        _, self.neighbours = self.search(self.bank, self.num_neighbors)  # M x b, itself first

    def search(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """N x D queries -> (N x k distances, N x k indices), nearest first."""
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self._search(query.float(), k)

    def _search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = max(1, _MAX_SCORES_PER_CHUNK // len(self.bank))
        distances, indices = [], []
        for start in range(0, len(query), chunk):
            rows = query[start : start + chunk]
            squared = torch.addmm(self.norms[None, :], rows, self.bank.t(), alpha=-2.0)
            squared.add_((rows * rows).sum(dim=1, keepdim=True))
            top = squared.topk(k, dim=1, largest=False)
            distances.append(top.values.clamp_min_(0.0).sqrt_())
            indices.append(top.indices)
        return torch.cat(distances), torch.cat(indices)

    def image_scores(self, query: torch.Tensor, nn_dist: torch.Tensor, nn_index: torch.Tensor,
                     valid: torch.Tensor | None) -> torch.Tensor:
        """The paper's Eq. 7 (torch_model.reweighted_image_scores) over the valid patches.
        query B x P x D, nn_dist / nn_index B x P, valid P bool or None."""
        scoring = nn_dist if valid is None else nn_dist.masked_fill(~valid.reshape(1, -1), 0.0)
        best = scoring.argmax(dim=1)
        rows = torch.arange(query.shape[0], device=query.device)
        s_star = scoring[rows, best]
        q_star = query[rows, best].float()
        neighbours = self.bank[self.neighbours[nn_index[rows, best]]]  # B x b x D
        distances = torch.linalg.vector_norm(neighbours - q_star[:, None, :], dim=-1)
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * s_star


__all__ = ["BankSearch", "KeySearch", "PatchCNN", "RoutingViT", "embed_patches", "gaussian_blur", "letterbox",
           "letterbox_box", "canvas_maps", "canvas_to_frames", "patch_maps_to_frames", "squeeze", "to_unit", "truncate_vit_state", "valid_grid"]
