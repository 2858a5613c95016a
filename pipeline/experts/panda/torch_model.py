"""PANDA's torch parts (Reiss et al., "PANDA: Adapting Pretrained Features for Anomaly Detection and
Segmentation", CVPR 2021).

The late part of the pretrained CNN is adapted to one category with the compactness loss (the mean
squared distance of the adapted global features to the centre of the pretrained ones), guarded against
catastrophic collapse by EWC (a diagonal-Fisher penalty towards the pretrained weights). Images are then
scored by DN2's kNN distance in the adapted global-feature space, and pixels by SPADE's kNN on the
adapted feature maps of the nearest fit images.

Here the adapted network (`PANDANet`) is a private copy of the EfficientNet-Lite blocks after stage 2
(stride 8), up to and including the ImageNet classifier's 1x1 conv head and its BatchNorm: it starts
from stage 2's frozen output, gives the adapted stage-3 map (stride 16) for SPADE and the global
feature = the globally averaged penultimate layer (1280-d), PANDA's choice of feature (the layer the
ImageNet classifier reads). `ImageNetClassifier` puts the pretrained classifier back on top, only to
estimate the Fisher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import timm
import torch
from torch import nn

START_STAGE = 2  # the frozen backbone stage the adapted network starts from (stride 8)
MAP_STAGE = 3  # the adapted stage whose maps SPADE compares (stride 16)


def stage_block(full: nn.Module, stage: int) -> int:
    """Index in `full.blocks` of the block that outputs backbone stage `stage` (the stage numbering of
    pipeline.features.backbone: timm's feature_info entry `stage`, e.g. 2 -> 'blocks.2', 3 -> 'blocks.4')."""
    module = full.feature_info[stage]["module"]
    prefix, index = module.split(".")
    if prefix != "blocks":
        raise ValueError(f"stage {stage} is produced by {module!r}, not by a block")
    return int(index)


class PANDANet(nn.Module):
    """The adapted late part: blocks[start + 1 :] of the CNN, then its conv head + BN (+ ReLU6).

    forward(stage-2 features B x C2 x h8 x w8) -> (stage-3 maps B x C3 x h16 x w16, global B x D)."""

    def __init__(self, blocks: nn.Sequential, map_index: int, conv_head: nn.Module, bn2: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.map_index = map_index  # position in `blocks` of the block giving the map stage
        self.conv_head = conv_head
        self.bn2 = bn2

    def forward(self, stage2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, maps = stage2, None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.map_index:
                maps = x
        return maps, self.bn2(self.conv_head(x)).mean(dim=(2, 3))


class ImageNetClassifier(nn.Module):
    """PANDANet's global feature through the pretrained ImageNet classifier: logits B x 1000."""

    def __init__(self, net: PANDANet, classifier: nn.Linear):
        super().__init__()
        self.net = net
        self.classifier = classifier

    def forward(self, stage2: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.net(stage2)[1])


def build_networks(timm_name: str, full_state: dict[str, torch.Tensor] | None = None) -> tuple[PANDANet, nn.Linear]:
    """A PANDANet and the classifier of timm's full `timm_name`, with `full_state` (the full model's
    state dict, classifier included) loaded strictly, or timm's initial weights when None (to load a
    stored state into). Both in eval mode: BatchNorm keeps its pretrained statistics throughout."""
    full = timm.create_model(timm_name, pretrained=False)
    if full_state is not None:
        full.load_state_dict(full_state, strict=True)
    start, map_block = stage_block(full, START_STAGE), stage_block(full, MAP_STAGE)
    net = PANDANet(full.blocks[start + 1 :], map_block - start - 1, full.conv_head, full.bn2)
    return net.eval(), full.classifier.eval()


# ------------------------------------------------------------------------------------------ losses
def compactness_loss(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """PANDA's compactness loss: mean over the batch of ||phi(x) - c||^2."""
    return (features - centre).pow(2).sum(dim=1).mean()


def ewc_penalty(params: Iterable[tuple[str, torch.Tensor]], anchor: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """EWC: 1/2 sum_i F_i (theta_i - theta*_i)^2. With F the Fisher of the classifier's predictive
    distribution, this is the second-order approximation of the mean KL divergence (nats) between the
    pretrained and the adapted classifier's predictions on the images the Fisher was estimated on."""
    total = None
    for name, p in params:
        term = (fisher[name] * (p - anchor[name]).pow(2)).sum()
        total = term if total is None else total + term
    return 0.5 * total


def diagonal_fisher(classifier: ImageNetClassifier, stage2: torch.Tensor, generator: torch.Generator,
                    samples_per_image: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the classifier's predictive distribution over PANDANet's parameters:
    F_i = mean over images x and labels y ~ p(y | x) of (d log p(y | x) / d theta_i)^2.

    The labels are sampled from the model's own predictions (the true Fisher, not the 'empirical' one
    of given labels): the fit images have no ImageNet labels, and the true Fisher is the one whose
    quadratic form approximates the KL divergence. One image at a time: the square of a batch's summed
    gradient is not the sum of the squares."""
    names = [n for n, p in classifier.net.named_parameters() if p.requires_grad]
    params = [p for p in classifier.net.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p) for p in params]
    count = 0
    for x in stage2:
        log_probs = torch.log_softmax(classifier(x[None]), dim=1)[0]
        probs = log_probs.detach().exp().cpu().double()
        labels = torch.multinomial(probs / probs.sum(), samples_per_image, replacement=True, generator=generator)
        for j, label in enumerate(labels.tolist()):
            grads = torch.autograd.grad(log_probs[label], params, retain_graph=j + 1 < len(labels))
            for f, g in zip(fisher, grads):
                f.add_(g.detach().pow(2))
            count += 1
    return {n: f / max(count, 1) for n, f in zip(names, fisher)}


# ----------------------------------------------------------------------------------------- scoring
def knn_scores(query: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """DN2: mean Euclidean distance of each query row (B x D) to its k nearest gallery rows (N x D)."""
    k = max(1, min(k, gallery.shape[0]))
    distances = torch.cdist(query.float(), gallery.float())
    return distances.topk(k, dim=1, largest=False).values.mean(dim=1)


def spade_maps(query_maps: torch.Tensor, query_globals: torch.Tensor, gallery_globals: torch.Tensor,
               gallery_maps: torch.Tensor, k_images: int) -> torch.Tensor:
    """SPADE: per location of each query map (B x C x h x w), the distance to the nearest location of the
    feature maps of its k_images nearest gallery images by global feature (gallery_globals M x D,
    gallery_maps M x L x C). Returns B x h x w."""
    k = max(1, min(k_images, gallery_globals.shape[0]))
    nearest = torch.cdist(query_globals.float(), gallery_globals.float()).topk(k, dim=1, largest=False).indices
    b, c, h, w = query_maps.shape
    locations = query_maps.float().flatten(2).transpose(1, 2)  # B x hw x C
    out = torch.empty(b, h * w, dtype=torch.float32, device=query_maps.device)
    for i in range(b):
        candidates = gallery_maps[nearest[i]].reshape(-1, c).float()  # k L x C
        out[i] = torch.cdist(locations[i], candidates).amin(dim=1)
    return out.view(b, h, w)


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """Probability that an anomaly outscores a normal image, ties counting half."""
    diff = anomalous.double()[:, None] - normal.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def log_separation(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """mean log score of the anomalies - mean log score of the normal images: how many times farther
    (geometrically) anomalies lie than normal images. Scale-free, so shrinking every distance alike (what
    the compactness loss does first) leaves it unchanged."""
    return float(anomalous.double().clamp_min(1e-12).log().mean() - normal.double().clamp_min(1e-12).log().mean())


def validation_loss(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    """Early stopping's monitored loss: 1 - AUROC, ties between epochs broken by the log separation.

    AUROC alone saturates (at 1 when held-out synthetic anomalies are all told apart, often already
    with the pretrained features) and moves in steps of 1 / (pairs). The tie-break term is below a
    quarter of a step in size, so AUROC always decides first; among equal AUROCs, the larger separation wins."""
    pairs = max(1, len(normal) * len(anomalous))
    return (1.0 - auroc(normal, anomalous)) - 0.25 / pairs * math.tanh(log_separation(normal, anomalous))


def half_stored(name: str, value: torch.Tensor) -> bool:
    """Whether a parameter is stored as float16: the convolution (and linear) kernels, 99% of the weights.
    The 1-d ones (BatchNorm's scales and shifts, 1% of them) stay float32: rounding those alone moved the
    global features more (3% of their spread on 224 x 544 grass) than rounding every kernel (2%)."""
    return value.ndim >= 2


def round_to_half(net: nn.Module) -> None:
    """Round the float16-stored parameters to float16 precision in place (kept as float32), so the fitted
    network is exactly the one its state loads into."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if half_stored(name, p):
                p.copy_(p.half().float())


__all__ = [
    "MAP_STAGE",
    "START_STAGE",
    "ImageNetClassifier",
    "PANDANet",
    "auroc",
    "build_networks",
    "compactness_loss",
    "diagonal_fisher",
    "ewc_penalty",
    "half_stored",
    "knn_scores",
    "log_separation",
    "round_to_half",
    "spade_maps",
    "stage_block",
    "validation_loss",
]
