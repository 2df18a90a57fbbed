"""GPU checks of the mixed-adapter kernels (bf16, real shapes) and of a mixed batch over a CUDA model.

Skipped without a GPU (tests/conftest.py). bf16 math is wrong in Triton's interpreter, so these are the
bf16 checks; tolerance from tests/_tolerance.py against float64.
"""
import copy

import pytest
import torch
from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from _weights import weight64

from peft_kernels.nn import Linear4bit
from peft_kernels.nn.multi_lora import MultiLoraLinear
from peft_kernels.ops.multi_lora import multi_lora_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n,seq", [(64, 4096, 4096, 0), (1, 4096, 14336, 0), (300, 1000, 513, 0),
                                       (1200, 1024, 2051, 300)])  # seq > 0: one slot per sequence (SGMV)
def test_layer_vs_reference_cuda(m, k, n, seq, dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(k, n)
    q4 = Linear4bit.from_linear(dense, blocksize=64).cuda()
    slots, r_max = 64, 16
    layer = MultiLoraLinear(q4, slots=slots, max_rank=r_max, dtype=dtype)
    for s in range(slots):
        r = (4, 8, 16)[s % 3]
        a = torch.randn(r, k, generator=g) / k ** 0.5
        b = torch.randn(n, r, generator=g) / r ** 0.5
        layer.write_slot(s, a.cuda(), b.cuda(), 2.0)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    idx = torch.randint(-1, slots, (m // seq if seq else m,), generator=g, dtype=torch.int32).cuda()
    layer.slot_index = idx
    with torch.no_grad():
        y = layer(x.view(m // seq, seq, k) if seq else x).reshape(m, n)
    if seq:
        idx = idx.repeat_interleave(seq)
    ref = multi_lora_reference(x.double().cpu(), weight64(q4).cpu(), q4.bias.double().cpu(),
                               layer.lora_A.double().cpu(), layer.lora_B.double().cpu(), layer.scaling.cpu(),
                               layer.ranks.cpu(), idx.cpu())
    assert_close_to_reference(y.cpu(), ref, dtype)


def test_mixed_batch_cuda_model_matches_single_adapters(tmp_path):
    from peft_kernels.io import load_adapter, save_adapter
    from peft_kernels.methods import lora
    from peft_kernels.quant import quantize_model
    from peft_kernels.serving import AdapterPool, mixed_adapters

    base = build("llama")
    quantize_model(base)
    base = base.cuda().eval()
    dirs = {}
    for i, r in enumerate((4, 16)):
        m = copy.deepcopy(base)
        torch.manual_seed(i)
        lora.apply(m, lora.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False))
        dirs[f"r{r}"] = tmp_path / f"r{r}"
        save_adapter(m, dirs[f"r{r}"])
    model = copy.deepcopy(base)
    pool = AdapterPool(model, slots=4, max_rank=16)
    for n, d in dirs.items():
        pool.load(n, d)
    names = ["r16", None, "r4"]
    ids = sample_ids(batch=3, seq=5).cuda()
    with torch.no_grad(), mixed_adapters(model, names):
        got = model(ids).logits
    for b, n in enumerate(names):
        single = copy.deepcopy(base)
        if n is not None:
            load_adapter(single, dirs[n])
        with torch.no_grad():
            want = single(ids).logits[b]
        # Both fp32 on the GPU (different kernels: the fused LoRA GEMM vs base + BGMV): the fp32 bound.
        assert_close_to_reference(got[b].cpu(), want.double().cpu(), torch.float32, f"row {b} ({n})")
