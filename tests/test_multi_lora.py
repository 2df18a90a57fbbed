"""Mixed-adapter LoRA (kernels/multi_lora.py, ops/multi_lora.py, nn/multi_lora.py) against the float64 reference.

Kernels run in Triton's interpreter without a GPU (fp32/fp16 only; bf16 on a GPU). Ragged shapes: rows
1 / 5 / 64, odd N and K, ranks 4 / 8 / 16 (and an empty slot) mixed in one batch with rows that name no
adapter; output buffers are poisoned with NaN. The CPU path is checked for bit equality with the
single-adapter LoraLinear path (and the base alone) row by row.
"""
import pytest
import torch
from _tolerance import assert_close_to_reference
from _weights import weight64

from peft_kernels.kernels import multi_lora as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.nn import Linear4bit, LoraLinear
from peft_kernels.nn._base import quant_args
from peft_kernels.nn.multi_lora import MultiLoraLinear
from peft_kernels.ops import multi_lora as O
from peft_kernels.ops.backend import ENV_VAR

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_ok = pytest.mark.skipif(DEVICE == "cpu" and not is_interpreted(K._bgmv_shrink_kernel),
                               reason="no GPU and triton was imported without TRITON_INTERPRET=1")
DTYPES = (torch.float32, torch.float16)
# (M rows, N, K, R slot size): odd sizes, a single row, a full decode batch.
SHAPES = ((1, 33, 65, 16), (5, 40, 96, 16), (64, 300, 130, 24))
RANKS = (4, 8, 16, 0)  # slot 3 is empty


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _slots(n, k, r_max, dtype, seed=0):
    """Slot tensors with ranks RANKS (padding zero) scaled so the LoRA term is as large as x W^T."""
    g = _gen(seed)
    s = len(RANKS)
    a = torch.zeros(s, r_max, k)
    b = torch.zeros(s, n, r_max)
    for i, r in enumerate(RANKS):
        a[i, :r] = torch.randn(r, k, generator=g) / k ** 0.5
        b[i, :, :r] = torch.randn(n, r, generator=g) * k ** 0.5 / max(r, 1) ** 0.5
    scales = torch.tensor([2.0, 0.5, 1.25, 3.0])
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), scales.to(DEVICE), ranks.to(DEVICE)


def _row_slots(m, seed=2):
    """Every slot and -1 present (for m >= 5), the rest random."""
    base = torch.tensor([0, -1, 1, 2, 3], dtype=torch.int32)
    rest = torch.randint(-1, len(RANKS), (max(m - 5, 0),), generator=_gen(seed), dtype=torch.int32)
    return torch.cat([base, rest])[:m].to(DEVICE)


def _ref_xa_y(x, a, b, scales, rows, y0):
    """float64 (xa [M, R], y0 + xa Bᵀ) row by row (rows: the slot of each row)."""
    ref_xa = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    ref = y0.double().cpu().clone()
    for i, s in enumerate(rows.tolist()):
        if s >= 0:
            ref_xa[i] = float(scales[s]) * (x[i].double().cpu() @ a[s].double().cpu().t())
            ref[i] += ref_xa[i] @ b[s].double().cpu().t()
    return ref_xa, ref


@triton_ok
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,r_max", SHAPES + ((3, 40, 1100, 16),))  # K = 1100: the shrink splits K in 3
def test_shrink_expand_kernels(m, n, k, r_max, dtype):
    a, b, scales, ranks = _slots(n, k, r_max, dtype)
    x = torch.randn(m, k, generator=_gen(3)).to(DEVICE, dtype)
    slots = _row_slots(m)
    n_split = K.shrink_split(k)[0]
    assert n_split == (3 if k == 1100 else 1)
    parts = torch.full((n_split, m, r_max), float("nan"), device=DEVICE)
    K.bgmv_shrink(x, a, scales, ranks, slots, out=parts)
    xa = parts.sum(0)
    y0 = torch.randn(m, n, generator=_gen(4)).to(DEVICE, dtype)
    ref_xa, ref = _ref_xa_y(x, a, b, scales, slots, y0)
    assert_close_to_reference(xa.cpu(), ref_xa, dtype, "xa")
    assert torch.equal(xa[slots.cpu() < 0].cpu(), torch.zeros_like(xa[slots.cpu() < 0].cpu()))
    y = y0.clone()
    K.bgmv_expand_(y, parts, b, ranks, slots)
    assert_close_to_reference(y.cpu(), ref, dtype, "y")
    untouched = (slots < 0) | (ranks[slots.clamp(min=0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])  # no adapter / empty slot: the base output bit for bit


@triton_ok
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seg,t,n,k,r_max", [(5, 17, 70, 65, 16), (2, 40, 33, 130, 24)])
def test_sgmv_kernels(seg, t, n, k, r_max, dtype):
    """Segments of t rows sharing a slot (prefill): ragged against the 32/64-row tiles, all slots and -1."""
    a, b, scales, ranks = _slots(n, k, r_max, dtype)
    m = seg * t
    x = torch.randn(m, k, generator=_gen(9)).to(DEVICE, dtype)
    seg_slots = _row_slots(seg)
    rows = seg_slots.repeat_interleave(t)
    xa = torch.full((m, r_max), float("nan"), device=DEVICE)
    K.sgmv_shrink(x, a, scales, ranks, seg_slots, t, out=xa)
    y0 = torch.randn(m, n, generator=_gen(10)).to(DEVICE, dtype)
    ref_xa, ref = _ref_xa_y(x, a, b, scales, rows, y0)
    assert_close_to_reference(xa.cpu(), ref_xa, dtype, "xa")
    y = K.sgmv_expand_(y0.clone(), xa, b, ranks, seg_slots, t)
    assert_close_to_reference(y.cpu(), ref, dtype, "y")
    assert torch.equal(y[rows < 0], y0[rows < 0])
    with pytest.raises(ValueError, match="must cover the"):
        K.sgmv_shrink(x, a, scales, ranks, seg_slots, t + 1)


def _quant_base(n, k, dtype, bias=True, blocksize=32):
    dense = torch.nn.Linear(k, n, bias=bias)
    torch.nn.init.normal_(dense.weight, generator=_gen(5))
    return Linear4bit.from_linear(dense, blocksize=blocksize, compute_dtype=dtype).to(DEVICE)


def _layer_reference(layer: MultiLoraLinear, x, slots):
    bias = layer.base_layer.bias
    return O.multi_lora_reference(x.double().cpu(), weight64(layer.base_layer).cpu(),
                                  None if bias is None else bias.double().cpu(), layer.lora_A.double().cpu(),
                                  layer.lora_B.double().cpu(), layer.scaling.cpu(), layer.ranks.cpu(), slots.cpu())


def _fill(layer, dtype):
    a, b, scales, ranks = _slots(layer.out_features, layer.in_features, layer.max_rank, dtype)
    for s, r in enumerate(RANKS):
        layer.write_slot(s, a[s, :r] if r else None, b[s, :, :r] if r else None, float(scales[s]))


# backend "auto" is the CPU path here (fp32; its fp16 is the same torch code) and the kernels on a GPU.
@pytest.mark.parametrize("backend,dtype", [pytest.param("triton", d, marks=triton_ok) for d in DTYPES]
                         + [("auto", torch.float32)])
@pytest.mark.parametrize("m,n,k,r_max", SHAPES[:2] + ((64, 40, 64, 16),))
def test_layer_4bit_vs_reference(monkeypatch, backend, m, n, k, r_max, dtype):
    monkeypatch.setenv(ENV_VAR, backend)
    layer = MultiLoraLinear(_quant_base(n, k, dtype), slots=len(RANKS), max_rank=r_max, dtype=dtype)
    _fill(layer, dtype)
    x = torch.randn(m, k, generator=_gen(6)).to(DEVICE, dtype)
    slots = _row_slots(m)
    layer.slot_index = slots
    with torch.no_grad():
        y = layer(x)
    assert_close_to_reference(y.cpu(), _layer_reference(layer, x, slots), dtype)


@triton_ok
@pytest.mark.parametrize("t", [4, 20])  # per-sequence slots: BGMV (short segments) and SGMV (>= 16 rows)
def test_layer_dense_triton_and_per_sequence_index(monkeypatch, t):
    monkeypatch.setenv(ENV_VAR, "triton")
    base = torch.nn.Linear(65, 33).to(DEVICE)
    layer = MultiLoraLinear(base, slots=len(RANKS), max_rank=16)
    _fill(layer, torch.float32)
    x = torch.randn(3, t, 65, generator=_gen(7)).to(DEVICE)
    per_seq = torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE)
    layer.slot_index = per_seq
    with torch.no_grad():
        y = layer(x)
    rows = per_seq.repeat_interleave(t)
    ref = O.multi_lora_reference(x.reshape(3 * t, 65).double().cpu(), base.weight.double().cpu(),
                                 base.bias.double().cpu(), layer.lora_A.double().cpu(), layer.lora_B.double().cpu(),
                                 layer.scaling.cpu(), layer.ranks.cpu(), rows.cpu())
    assert_close_to_reference(y.reshape(3 * t, 33).cpu(), ref, torch.float32)


# ------------------------------------------------------------------ CPU path: bit equality with single adapters
@pytest.mark.skipif(DEVICE != "cpu", reason="the exact CPU path")
@pytest.mark.parametrize("m", [1, 5, 12])
@pytest.mark.parametrize("kind", ["4bit", "linear"])
def test_cpu_rows_equal_single_adapter_path(monkeypatch, m, kind):
    """Each row equals LoraLinear with that row's adapter alone active on the whole batch (torch.equal), and
    rows without an adapter equal the base layer."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    n, k = 40, 96
    base = _quant_base(n, k, None) if kind == "4bit" else torch.nn.Linear(k, n)
    layer = MultiLoraLinear(base, slots=len(RANKS), max_rank=16)
    single = LoraLinear(base, adapter_name=None)
    a, b, scales, _ = _slots(n, k, 16, torch.float32)
    for s, r in enumerate(RANKS[:3]):
        name = f"a{s}"
        single.add_adapter(name, r, lora_alpha=float(scales[s]) * r, init_lora_weights=False)
        with torch.no_grad():
            single.lora_A[name].weight.copy_(a[s, :r])
            single.lora_B[name].weight.copy_(b[s, :, :r])
        layer.write_slot(s, single.lora_A[name].weight, single.lora_B[name].weight, single.scaling[name])
    x = torch.randn(m, k, generator=_gen(8))
    slots = _row_slots(m)
    layer.slot_index = slots
    with torch.no_grad():
        y = layer(x)
        for i, s in enumerate(slots.tolist()):
            if s in (0, 1, 2):
                single.set_adapter(f"a{s}")
                want = single(x)
            else:  # no adapter, or the empty slot 3
                want = base(x)
            assert torch.equal(y[i], want[i]), (i, s)


# ------------------------------------------------------------------ bad input
def test_bad_inputs():
    layer = MultiLoraLinear(torch.nn.Linear(8, 6), slots=2, max_rank=4)
    x = torch.randn(3, 8)
    layer.slot_index = torch.tensor([0, 1, 2], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"slot indices must be in \[-1, 2\)"):
        layer(x)
    layer.slot_index = torch.tensor([0, 1], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="names 2 adapters but x has shape"):
        layer(x)
    layer.slot_index = torch.tensor([0, 1, 1], dtype=torch.int64)
    with torch.no_grad(), pytest.raises(ValueError, match="slots must be int32"):
        layer(x)
    layer.slot_index = torch.tensor([0, -1, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x.requires_grad_())
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        MultiLoraLinear(torch.nn.Linear(8, 6), slots=2, max_rank=0)
    with pytest.raises(TypeError, match="MultiLoraLinear wraps"):
        MultiLoraLinear(torch.nn.Conv2d(1, 1, 1), slots=2, max_rank=4)
    with pytest.raises(ValueError, match=r"lora_A \[S, R, 8\]"):
        O.check_slots(torch.zeros(2, 4, 9), torch.zeros(2, 6, 4), torch.zeros(2), torch.zeros(2, dtype=torch.int32),
                      torch.zeros(3, dtype=torch.int32), 3, 6, 8)
    with pytest.raises(ValueError, match=r"ranks must be in \[0, 4\]"):
        O.check_slots(torch.zeros(2, 4, 8), torch.zeros(2, 6, 4), torch.zeros(2),
                      torch.tensor([5, 0], dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 3, 6, 8)


@triton_ok
def test_kernel_launcher_errors():
    x = torch.randn(2, 8, device=DEVICE)
    a = torch.zeros(2, 4, 8, device=DEVICE)
    sc, rk = torch.zeros(2, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="lora_A has dtype float16"):
        K.bgmv_shrink(x, a.half(), sc, rk, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"slots must have shape \[2\]"):
        K.bgmv_shrink(x, a, sc, rk, torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"xa \[P, M, R\]"):
        K.bgmv_expand_(torch.zeros(2, 6, device=DEVICE), torch.zeros(1, 2, 4, device=DEVICE),
                       torch.zeros(2, 5, 4, device=DEVICE), rk, torch.zeros(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU op registration check")
def test_ops_opcheck_and_fullgraph_compile():
    """The custom ops pass torch.library.opcheck (schema, fake impl); the layer compiles with fullgraph=True and
    a new slot index (same shape) reuses the graph."""
    base = _quant_base(48, 64, None, blocksize=64)
    layer = MultiLoraLinear(base, slots=len(RANKS), max_rank=16)
    _fill(layer, torch.float32)
    x = torch.randn(6, 64, generator=_gen(11))
    slots = _row_slots(3)
    torch.library.opcheck(O.multi_lora_4bit_op, (x, *quant_args(base), 48, base.bias, layer.lora_A, layer.lora_B,
                                                 layer.scaling, layer.ranks, slots, 2))
    dense = torch.nn.Linear(64, 48)
    torch.library.opcheck(O.multi_lora_dense_op, (x, dense.weight.detach(), None, layer.lora_A, layer.lora_B,
                                                  layer.scaling, layer.ranks, slots, 2))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x3 = x.view(3, 2, 64)
    with torch.no_grad():
        for idx in ([1, -1, 0], [2, 2, -1]):
            layer.slot_index = torch.tensor(idx, dtype=torch.int32)
            assert torch.equal(compiled(x3), layer(x3))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
