"""Training: one optimizer step matches timm, torch.compile traces the models whole, DDP gradients match.

Tiny configs; the reference backend except where a test names the Triton kernels (run through Triton's
interpreter on a CPU-only machine).
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer as TimmViT

import dlcv_fast
from dlcv_fast.models import SwinTransformer, VisionTransformer, from_timm

TINY_VIT = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4)
# stage maps 8x8 and 4x4 with 3x3 windows: padding and shifted windows in both stages
TINY_SWIN = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                 window_size=3)


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_step(model, x, y, backend):
    """One SGD step with momentum and weight decay; returns the loss and the gradients by parameter name.
    (Not Adam: its first step is lr * sign(grad), which amplifies round-off in the zero gradient of k's bias.)"""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    with dlcv_fast.use_backend(backend):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads


def check_step_matches(ref, x, y, backend, device="cpu"):
    ours = from_timm(ref).to(device)
    ref_loss, ref_grads = train_step(ref, x, y, "torch")
    loss, grads = train_step(ours, x.to(device), y.to(device), backend)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g.cpu(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.detach().cpu(), ref_params[name].detach(), rtol=1e-5, atol=1e-6)


def test_vit_train_step_matches_timm():
    torch.manual_seed(0)
    check_step_matches(TimmViT(**TINY_VIT).train(), *batch(), "torch")


def test_vit_train_step_triton_kernels(device):
    torch.manual_seed(1)
    check_step_matches(TimmViT(**{**TINY_VIT, "depth": 1}).train(), *batch(2), "triton", device)


def test_swin_train_step_matches_timm():
    torch.manual_seed(4)
    check_step_matches(TimmSwin(**TINY_SWIN, drop_path_rate=0.0).train(), *batch(), "torch")


def test_swin_train_step_triton_kernels(device):
    torch.manual_seed(5)
    ref = TimmSwin(**{**TINY_SWIN, "depths": (2,), "num_heads": (2,)}, drop_path_rate=0.0).train()
    check_step_matches(ref, *batch(2), "triton", device)


def tiny_model(arch):
    if arch == "vit":
        return VisionTransformer(**{**TINY_VIT, "depth": 1})
    return SwinTransformer(**{**TINY_SWIN, "depths": (2,), "num_heads": (2,)})


def check_compiled_step(model, x, y, backend):
    """fullgraph=True: the models trace whole (the custom ops have fake implementations); the compiled
    forward and gradients equal eager."""
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    with dlcv_fast.use_backend(backend):
        loss = F.cross_entropy(model(x), y)
        loss_c = F.cross_entropy(compiled(x), y)
        loss.backward()
        loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for (name, p), pc in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_torch_compile_fullgraph(arch):
    torch.manual_seed(2)
    check_compiled_step(tiny_model(arch), *batch(), "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_torch_compile_fullgraph_gpu_kernels(arch):
    torch.manual_seed(2)
    check_compiled_step(tiny_model(arch).cuda(), *(t.cuda() for t in batch()), "triton")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, x, y, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = VisionTransformer(**TINY_VIT)
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        with dlcv_fast.use_backend("torch"):
            F.cross_entropy(ddp(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    torch.manual_seed(3)
    model = VisionTransformer(**TINY_VIT)
    x, y = batch(4)
    with dlcv_fast.use_backend("torch"):
        F.cross_entropy(model(x), y).backward()
    out_path = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), model.state_dict(), x, y, str(out_path)), nprocs=2)
    ddp_grads = torch.load(out_path)
    # equal up to float32 rounding: a batch of 4 and two of 2 (averaged by DDP) sum in different orders, which
    # moved single elements by up to ~1e-7 here (1.05e-7 in head.weight, 6e-8 without the class-token readout)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
