"""Memory switches on a real GPU: the Triton gather-dequant in bf16 at the Llama-3 vocabulary (which the
interpreter cannot check), the 4-bit head with trainable rows in bf16, and checkpoint offload to pinned
host memory with side-stream copies (the CPU tests use a stand-in transfer).

Run on a lent GPU with ``pytest -m gpu tests/test_gpu_memory_switches.py`` (skipped without CUDA).
"""
import pytest
import torch

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from _weights import weight64
from peft_kernels.methods.lora import LoraConfig
from peft_kernels.nn import Embedding4bit, Linear4bitHead
from peft_kernels.prepare import prepare
from peft_kernels.train.checkpointing import enable_checkpointing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("m", (1, 777))
def test_gather_dequant_at_llama3_vocab(dtype, m):
    v, h = 128256, 4096
    emb = torch.nn.Embedding(v, h, device="cuda", dtype=dtype)
    layer = Embedding4bit.from_embedding(emb)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, v, (m,), device="cuda", generator=g)
    ids[0] = v - 1
    w64 = weight64(layer)
    assert_close_to_reference(layer(ids), w64[ids], dtype, f"rows {dtype} m={m}")


def test_head_with_trainable_rows_bf16():
    v, h, m = 5003, 1024, 333
    dense = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    head = Linear4bitHead.from_linear(dense)
    head.set_trainable_tokens([0, 17, v - 1])
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, v, device="cuda", dtype=torch.bfloat16)
    y = head(x)
    dx, dr = torch.autograd.grad(y, (x, head.trainable_tokens_delta), dy)
    w = weight64(head).clone()
    idx = head.trainable_token_indices
    w[idx] = head.trainable_tokens_delta.detach().double()
    x64, dy64 = x.detach().double(), dy.double()
    assert_close_to_reference(y, x64 @ w.t(), torch.bfloat16, "y")
    assert_close_to_reference(dx, dy64 @ w, torch.bfloat16, "dX")
    assert_close_to_reference(dr, dy64[:, idx].t() @ x64, torch.bfloat16, "dRows")


def test_offload_uses_pinned_memory_and_matches_no_offload():
    ids = sample_ids(2, 12).cuda()
    grads = {}
    for offload in (False, True):
        model, _ = prepare(build("llama", num_hidden_layers=3).cuda(),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"), quantize=True)
        rep = enable_checkpointing(model, offload=offload)
        model.train()
        loss = model(ids, labels=ids).loss
        if offload:
            assert rep.offload_active and rep.offloader.stats.offloaded_bytes == 2 * 2 * 12 * 64 * 4
            stash = rep.offloader._last()          # the last offloaded checkpoint, alive until its backward
            assert stash.host.device.type == "cpu" and stash.host.is_pinned()
        loss.backward()
        torch.cuda.synchronize()
        grads[offload] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if offload:
            assert rep.offloader.stats.fetch_order == [1, 0]
    for n, g in grads[False].items():
        assert_close_to_reference(grads[True][n].double(), g.double(), torch.float32, n)
