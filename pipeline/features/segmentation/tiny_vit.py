"""MobileSAM's image encoder: TinyViT-5M at 1024 x 1024 input, ending in SAM's 256-channel neck.

MobileSAM distils SAM's ViT-H encoder into this small hybrid network so that the prompt encoder and
mask decoder of SAM can be kept unchanged. Module and parameter names follow the checkpoint's
`image_encoder.*` keys so that it loads with strict=True.

Shapes for a 1024 input: stem (two stride-2 convs) -> 256^2 x 64 -> MBConv stage -> merge (stride 2)
-> 128^2 x 128 -> attention stage -> merge (stride 2) -> 64^2 x 160 -> attention stage -> merge
(stride 1: MobileSAM keeps 64^2 so the embedding matches SAM's) -> 64^2 x 320 -> attention stage
-> neck -> 256 x 64 x 64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 1024
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)  # stage 0 is convolutional and has no heads
WINDOW_SIZES = (7, 7, 14, 7)
MLP_RATIO = 4
MBCONV_EXPAND_RATIO = 4
NECK_CHANNELS = 256
IMAGENET_CLASSES = 1000


class ConvBN(nn.Sequential):
    """Bias-free convolution + batch norm (the checkpoint's `c` / `bn` pairs); 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: 1024^2 pixels -> 256^2 tokens."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(3, out_channels // 2, 3, stride=2),
            nn.GELU(),
            ConvBN(out_channels // 2, out_channels, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (expand 1x1, depthwise 3x3, project 1x1); GELU also after the residual sum."""

    def __init__(self, channels: int, expand_ratio: int):
        super().__init__()
        hidden = channels * expand_ratio
        self.conv1 = ConvBN(channels, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change width (1x1), downsample with a depthwise 3x3 of the given stride, mix (1x1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels)
        self.conv2 = ConvBN(out_channels, out_channels, 3, stride=stride, groups=out_channels)
        self.conv3 = ConvBN(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window: int) -> torch.Tensor:
    """T x T index of the learned bias for each token pair (T = window^2): |dy| * window + |dx|.

    The bias depends only on the absolute offset between two tokens, so a window has window^2
    distinct biases per head (the checkpoint's `attention_biases`: heads x window^2).
    """
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()


class WindowAttention(nn.Module):
    """Multi-head self-attention within one window, pre-normalised, plus a learned offset bias."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", relative_offset_index(window), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: windows x T x C -> windows x T x C."""
        windows, length, dim = tokens.shape
        qkv = self.qkv(self.norm(tokens))
        # The checkpoint lays the projection out head by head: [q_h, k_h, v_h] for each head h.
        q, k, v = qkv.view(windows, length, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.bias_index]  # heads x T x T
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(windows, length, dim))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), a depthwise 3x3 'local conv' (no residual), an MLP (residual)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> B x C x H x W."""
        tokens = x.permute(0, 2, 3, 1)  # B x H x W x C
        tokens = tokens + self._windowed_attention(tokens)
        x = self.local_conv(tokens.permute(0, 3, 1, 2))
        tokens = x.permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        return tokens.permute(0, 3, 1, 2).contiguous()

    def _windowed_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Zero-pad H, W up to multiples of the window (the padding takes part in attention, as in
        training), attend within each window, crop back."""
        batch, height, width, dim = tokens.shape
        w = self.window
        pad_h, pad_w = -height % w, -width % w
        padded = F.pad(tokens, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // w, (width + pad_w) // w
        windows = padded.view(batch, rows, w, cols, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        attended = self.attn(windows)
        merged = attended.view(batch, rows, cols, w, w, dim).transpose(2, 3).reshape(
            batch, rows * w, cols * w, dim)
        return merged[:, :height, :width]


class Mlp(nn.Module):
    """Pre-normalised two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Stage(nn.Module):
    """A stage's blocks, then (except for the last stage) a PatchMerging into the next width."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """Image encoder for `segment_anything.modeling.Sam`: B x 3 x 1024 x 1024 (SAM-normalised)
    -> B x 256 x 64 x 64."""

    img_size = IMAGE_SIZE  # read by segment-anything's predictor (ResizeLongestSide) and Sam.preprocess

    def __init__(self):
        from segment_anything.modeling.common import LayerNorm2d  # with SAM, which this encoder only serves

        super().__init__()
        self.patch_embed = PatchEmbed(EMBED_DIMS[0])
        self.layers = nn.ModuleList()
        for index, (dim, depth) in enumerate(zip(EMBED_DIMS, DEPTHS)):
            if index == 0:
                blocks = [MBConv(dim, MBCONV_EXPAND_RATIO) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dim, NUM_HEADS[index], WINDOW_SIZES[index], MLP_RATIO)
                          for _ in range(depth)]
            last = index == len(EMBED_DIMS) - 1
            # MobileSAM's change to TinyViT: the merge into the last stage keeps the resolution.
            stride = 1 if index == len(EMBED_DIMS) - 2 else 2
            downsample = None if last else PatchMerging(dim, EMBED_DIMS[index + 1], stride)
            self.layers.append(Stage(blocks, downsample))
        # TinyViT's ImageNet classifier: unused by SAM, kept only because the checkpoint ships it and
        # strict loading should account for every key.
        self.norm_head = nn.LayerNorm(EMBED_DIMS[-1])
        self.head = nn.Linear(EMBED_DIMS[-1], IMAGENET_CLASSES)
        self.neck = nn.Sequential(
            nn.Conv2d(EMBED_DIMS[-1], NECK_CHANNELS, kernel_size=1, bias=False),
            LayerNorm2d(NECK_CHANNELS),
            nn.Conv2d(NECK_CHANNELS, NECK_CHANNELS, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(NECK_CHANNELS),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x)
