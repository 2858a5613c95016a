"""The frozen CNN runs channels-last with its batch norms folded: the checkpoint's features."""

from __future__ import annotations

import torch

from pipeline.features.backbone import Backbone


def test_channels_last_cnn_gives_the_contiguous_features(one_torch_thread) -> None:
    backbone = Backbone.pretrained()
    pixels = torch.rand(2, 3, 96, 232, generator=torch.Generator().manual_seed(0))
    fast = backbone(pixels, keys=False)
    assert next(backbone.net.parameters()).is_contiguous(memory_format=torch.channels_last)
    reference = [t.contiguous() for t in backbone.net.to(memory_format=torch.contiguous_format)((pixels - 0.5) / 0.5)]
    for stage, expected in zip(backbone.stage_ids, reference):
        torch.testing.assert_close(fast.stages[stage].contiguous(), expected, rtol=1e-4, atol=1e-4)  # folding: rounding


def test_folded_inference_net_gives_the_checkpoint_features_and_leaves_net_alone(one_torch_thread) -> None:
    backbone = Backbone.pretrained()
    before = {k: v.clone() for k, v in backbone.net.state_dict().items()}
    pixels = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    folded = backbone(pixels, keys=False).stages
    norms = [m for m in backbone.inference_net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not norms  # every norm was folded
    with torch.inference_mode():
        reference = backbone.net((pixels - 0.5) / 0.5)
    for stage, expected in zip(backbone.stage_ids, reference):
        torch.testing.assert_close(folded[stage], expected, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in backbone.net.state_dict().items())
    assert "_inference_net" not in "".join(backbone.state_dict())  # not a submodule: state unchanged
