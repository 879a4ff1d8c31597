"""Swin against timm on the same random weights (fp32 ours vs fp64 timm, rule in tests/models/common.py).

Full-size swin_tiny on the reference backend; our Triton window-attention kernel on a tiny config whose
stages exercise padding, shifted windows and windows shrunk to the feature map.
"""
import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer as TimmSwin

import dlcv_fast
from dlcv_fast.models import create_model, from_timm, list_models
from tests.models.common import check_model, fp64_copy


def run_parity(ref, x, backend, dev="cpu"):
    ours = from_timm(ref).to(dev)
    with torch.no_grad():
        with dlcv_fast.use_backend(backend):
            out = ours(x.to(dev))
        check_model(out, ref(x), fp64_copy(ref)(x.double()))


def test_swin_tiny_parity_reference_backend():
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    run_parity(ref, torch.randn(1, 3, 224, 224), "torch")


def test_swin_tiny_other_size():
    """160 x 192: stage maps 40x48 .. 5x6, so padding to the 7x7 windows, and a last stage whose window
    shrinks to the 5x6 map without shifts."""
    torch.manual_seed(1)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(160, 192)).eval()
    run_parity(ref, torch.randn(1, 3, 160, 192), "torch")


def tiny_timm_swin(**kw):
    cfg = dict(img_size=(40, 48), patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
               num_classes=10, drop_path_rate=0.0)
    return TimmSwin(**{**cfg, **kw}).eval()


def test_tiny_parity_triton_kernels(device):
    """Stage maps 10x12 and 5x6 with 4x4 windows: padding and shifted windows in both stages."""
    torch.manual_seed(2)
    run_parity(tiny_timm_swin(), torch.randn(2, 3, 40, 48), "triton", device)


@pytest.mark.parametrize("name", list_models("swin_*"))
def test_registry_matches_timm_layout(name):
    with torch.device("meta"):
        ours, ref = create_model(name), timm.create_model(name, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_from_timm_carries_stochastic_depth_and_refuses_dropout():
    """timm's per-block drop-path rates (default drop_path_rate=0.1 for Swin) come over, so training the
    converted model regularises like timm's; dropout, which our model does not have, raises."""
    ref = tiny_timm_swin(drop_path_rate=0.3)
    ours = from_timm(ref)
    ref_rates = [getattr(getattr(b, n), "drop_prob", 0.0) for s in ref.layers for b in s.blocks
                 for n in ("drop_path1", "drop_path2")]
    our_rates = [getattr(getattr(b, n), "p", 0.0) for s in ours.layers for b in s.blocks
                 for n in ("drop_path1", "drop_path2")]
    assert our_rates == pytest.approx(ref_rates) and max(our_rates) == pytest.approx(0.3)
    # In train mode the branches are dropped per sample: outputs differ from eval mode, as timm's do.
    x = torch.randn(4, 3, 40, 48)
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        assert not torch.allclose(ours.train()(x), ours.eval()(x))
    with pytest.raises(NotImplementedError, match=r"dropout > 0 .*proj_drop_rate=0"):
        from_timm(tiny_timm_swin(proj_drop_rate=0.1))
