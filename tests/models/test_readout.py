"""The last block computed for the read-out tokens only (run_blocks' ``readout``): a classifier's class token,
CLIP's end-of-text token. Same outputs and gradients as computing every token and picking afterwards."""
import pytest
import torch
from torch import nn

import dlcv_fast
from dlcv_fast.models import create_model
from dlcv_fast.models.clip import TextTransformer
from dlcv_fast.nn import Block
from dlcv_fast.nn.block import run_blocks
from dlcv_fast.nn.norm import LayerNorm


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class Counting(nn.Module):
    """A user's wrapper around a module (a block, an attention): counts its calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, **kw):
        self.calls += 1
        return self.inner(x, **kw)


@pytest.mark.parametrize("train,qk_norm", [(False, False), (True, False), (False, True)])
def test_run_blocks_readout_equals_picking_afterwards(train, qk_norm, device):
    """Prefix rows and one gathered row per sample (with its causal mask as a key padding mask); in training
    with stochastic depth the random draws are the same, and so are the input gradients; with q/k norms."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(32, 2, 64, qk_norm=qk_norm, drop_path=0.2 if train else 0.0) for _ in range(3)])
    blocks, norm = blocks.to(device).train(train), LayerNorm(32).to(device)
    B, N = 3, 11
    x = torch.randn(B, N, 32, device=device, requires_grad=True)
    pos = torch.tensor([4, 10, 0], device=device)
    rows = torch.arange(B, device=device)
    cases = [(lambda t: t[:, :2], {}, {}),
             (lambda t: t[rows, pos][:, None], dict(causal=True),
              dict(key_padding_mask=torch.arange(N, device=device)[None] <= pos[:, None]))]
    for select, kw, last_kw in cases:
        torch.manual_seed(1)
        got = run_blocks(blocks, x, norm, [kw] * 3, readout=select, readout_kwargs=last_kw)
        torch.manual_seed(1)
        want = select(run_blocks(blocks, x, norm, [kw] * 3))
        assert got.shape == want.shape
        _close(got, want)
        g1, = torch.autograd.grad(got.square().sum(), x)
        g2, = torch.autograd.grad(want.square().sum(), x)
        _close(g1, g2)


def test_readout_computes_only_the_read_rows(monkeypatch):
    """The last block's attention runs with the prefix tokens as its only queries (ViT: 1, DeiT distilled: 2)."""
    calls = []
    real = dlcv_fast.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dlcv_fast, "attention", spy)
    for name, prefix in (("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)):
        model = create_model(name, img_size=32, depth=3, num_classes=5).eval()
        x = torch.randn(2, 3, 32, 32)
        calls.clear()
        with torch.no_grad():
            logits = model(x)
        assert calls == [(prefix + 4, prefix + 4)] * 2 + [(prefix, prefix + 4)]
        with torch.no_grad():
            _close(logits, model.forward_head(model.forward_features(x)))


def test_readout_steps_aside_for_hooks():
    """A forward hook anywhere in the last block sees the shapes of a full forward (the readout is not used)."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.blocks[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        hooked = model(x)
    handle.remove()
    assert seen == [torch.Size([2, 5, 192])]  # every token (class + 2 x 2 patches), not the class token alone
    with torch.no_grad():
        _close(hooked, model(x))


@pytest.mark.parametrize("eos_token_id", [None, 2])
def test_clip_text_readout(eos_token_id, device):
    """CLIP's text tower: the end-of-text row alone in the last block, with and without a padding mask."""
    torch.manual_seed(0)
    model = TextTransformer(context_length=16, vocab_size=50, width=32, heads=2, layers=3, output_dim=8,
                            eos_token_id=eos_token_id).to(device).eval()
    text = torch.randint(3, 40, (3, 16))
    eos = 49 if eos_token_id is None else eos_token_id
    text[0, 5], text[1, 15], text[2, 0] = eos, eos, eos
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 9:] = 0
    text, mask = text.to(device), mask.to(device)
    for m in (None, mask):
        with torch.no_grad():
            got = model(text, m)
            feats = model.forward_features(text, m)
        _close(got, model.head(feats[torch.arange(3, device=device), model.eot_index(text)]))


def test_readout_calls_a_wrapped_qkv_whole():
    """A qkv Linear that is not a plain nn.Linear (a LoRA-style wrapper adding a low-rank delta) is called as a
    module, not bypassed through its weight: the readout keeps its delta."""

    class LoRALinear(nn.Linear):
        def __init__(self, base, rank=2):
            super().__init__(base.in_features, base.out_features)
            self.load_state_dict(base.state_dict())
            self.a = nn.Parameter(torch.randn(rank, base.in_features))
            self.b = nn.Parameter(torch.randn(base.out_features, rank))

        def forward(self, x):
            return super().forward(x) + x @ self.a.t() @ self.b.t()

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    model.blocks[-1].attn.qkv = LoRALinear(model.blocks[-1].attn.qkv)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(model(x), model.forward_head(model.forward_features(x)))


def test_replaced_blocks_are_called_as_modules():
    """A block the user replaced (here by a wrapper around the original) is called, not bypassed."""

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        model.blocks[-1] = Counting(model.blocks[-1])
        got = model(x)
    assert model.blocks[-1].calls == 1
    _close(got, want)


def test_clip_text_cut_after_the_last_end_of_text(monkeypatch):
    """Tokens after the batch's last end-of-text token are not computed in eager mode (the mask is causal: they
    cannot reach a pooled output); under torch.compile the full length runs. Same features either way."""
    calls = []
    real = dlcv_fast.attention

    def spy(q, k, v, **kw):
        calls.append(k.shape[2])
        return real(q, k, v, **kw)

    torch.manual_seed(0)
    model = TextTransformer(context_length=16, vocab_size=50, width=32, heads=2, layers=2, output_dim=8).eval()
    text = torch.randint(3, 40, (2, 16))
    text[0, 5], text[1, 9] = 49, 49
    text[:, 10:] = 0  # padding after the longest text, as open_clip's tokenizer writes it
    mask = (text != 0).long()
    monkeypatch.setattr(dlcv_fast, "attention", spy)
    for m in (None, mask):
        with torch.no_grad():
            calls.clear()
            cut = model(text, m)
            assert calls == [10, 10]
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            calls.clear()
            full = model(text, m)
            assert calls == [16, 16]
            monkeypatch.undo()
            monkeypatch.setattr(dlcv_fast, "attention", spy)
        _close(cut, full)
        with torch.no_grad():
            feats = model.forward_features(text, m)
        _close(cut, model.head(feats[torch.arange(2), model.eot_index(text)]))


def test_clip_text_cut_only_in_plain_eager_mode():
    """The cut reads a position on the host, so it must not happen where shapes must not depend on the data:
    a trace taken on short texts still serves longer ones; meta and fake tensors run the full length."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    model = TextTransformer(context_length=12, vocab_size=50, width=32, heads=2, layers=2, output_dim=8).eval()
    short, long = torch.randint(3, 40, (2, 12)), torch.randint(3, 40, (2, 12))
    short[0, 3], short[1, 4], long[0, 10], long[1, 11] = 49, 49, 49, 49
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (short,), check_trace=False)
        _close(traced(long), model(long))
        with torch.device("meta"):
            meta = TextTransformer(context_length=12, vocab_size=50, width=32, heads=2, layers=2, output_dim=8)
            assert meta(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 8)
        with FakeTensorMode():
            fake = TextTransformer(context_length=12, vocab_size=50, width=32, heads=2, layers=2, output_dim=8)
            assert fake(torch.zeros(2, 12, dtype=torch.long)).shape == (2, 8)


def test_readout_leaves_subclasses_and_replaced_attention_alone():
    """A last block whose attention was replaced or subclassed, a Block subclass, or a model subclass with its own
    forward_features: the readout would bypass their code, so the model runs them as they are."""
    from dlcv_fast.nn.attention import Attention
    from dlcv_fast.models.vit import VisionTransformer

    class Scaled(Attention):
        def forward(self, x, **kw):
            return 2 * super().forward(x, **kw)

    class Features(VisionTransformer):
        def forward_features(self, x):
            return super().forward_features(x) + 1

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    full = lambda m: m.forward_head(m.forward_features(x))  # noqa: E731
    with torch.no_grad():
        model.blocks[-1].attn = Counting(model.blocks[-1].attn)
        _close(model(x), full(model))
        assert model.blocks[-1].attn.calls == 2
        scaled = Scaled(192, 3, qkv_bias=True)
        scaled.load_state_dict(model.blocks[-1].attn.inner.state_dict())
        model.blocks[-1].attn = scaled
        _close(model(x), full(model))
        sub = Features(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=5).eval()
        _close(sub(x), full(sub))
