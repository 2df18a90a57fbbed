"""Fused linear cross-entropy (ops/fused_ce.py, kernels/cross_entropy.py) against the full-logits reference.

Every case compares loss, z-loss and the gradients (dH, dW, db) with ``ops/reference_ce.py``'s
``F.cross_entropy`` over the full float64 logits, under the tolerance policy (tests/_tolerance.py), on
ragged T / V / H (no multiple of any chunk or tile), with one chunk and with many. The Triton row kernel
runs in Triton's interpreter (fp32 and fp16 logits; the interpreter's bf16 is wrong: bf16 is in
tests/test_gpu_fused_ce.py), its outputs poisoned with NaN first. The 4-bit head is checked against
float64 over its dequantized weight. Memory: an allocation tracker shows no [T, V] tensor is ever made,
and the bytes saved for backward are counted exactly.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _alloc_tracker import AllocTracker
from _tolerance import assert_close_to_reference
from _weights import weight64

from peft_kernels.kernels import cross_entropy as K
from peft_kernels.kernels._launch import is_interpreted
from peft_kernels.nn import Linear4bit
from peft_kernels.ops import reference
from peft_kernels.ops.fused_ce import (FP16_GRAD_SCALE, fused_linear_cross_entropy, head_logits, resolve_head)
from peft_kernels.ops.reference_ce import ce_rows_reference, linear_cross_entropy_reference

T, H, V = 37, 24, 101  # ragged everywhere
#: option sets that exercise each term alone and all together (logit_scale: Cohere / Granite style)
OPTIONS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "softcap": {"softcap": 2.5},
    "zloss": {"z_loss": 1e-2},
    "all": {"label_smoothing": 0.2, "softcap": 4.0, "z_loss": 5e-3, "logit_scale": 0.6},
}
needs_interpreter = pytest.mark.skipif(not torch.cuda.is_available() and not is_interpreted(K._ce_rows_kernel),
                                       reason="no GPU and triton was imported without TRITON_INTERPRET=1")


def _data(t=T, h=H, v=V, dtype=torch.float32, seed=0, ignore_every=4, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(dtype)  # logits ~ N(0, 9): a peaked softmax
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (t,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, **kw):
    """(loss, z, dH, dW, db) from the float64 full-logits reference."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    loss, z = linear_cross_entropy_reference(h, w, labels, b, **kw)
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return (loss.detach(), z.detach(), *grads)


def _fused(hidden, weight, bias, labels, **kw):
    """(loss, z, dH, dW, db) from the fused op over an nn.Linear holding weight and bias."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    h = hidden.clone().requires_grad_(True)
    loss, z = fused_linear_cross_entropy(h, lin, labels, return_z_loss=True, **kw)
    loss.backward()
    return (loss.detach(), z, h.grad, lin.weight.grad, *(() if bias is None else (lin.bias.grad,)))


# ---------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_reference_rows_closed_form_is_the_autograd_gradient(opt):
    """ce_rows_reference's closed-form loss, lse and gradient equal F.cross_entropy + z-loss by autograd."""
    kw = OPTIONS[opt]
    _, _, _, labels = _data()
    raw = (torch.randn(T, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_()
    ce, lse, dr = ce_rows_reference(raw, labels, **kw)
    z = reference.transform_logits(raw, kw.get("softcap"), kw.get("logit_scale", 1.0))
    want_ce = F.cross_entropy(z, labels, label_smoothing=kw.get("label_smoothing", 0.0), reduction="none")
    want_lse = torch.logsumexp(z, 1) * (labels != -100)
    total = want_ce.sum() + kw.get("z_loss", 0.0) * (want_lse ** 2).sum()
    (want_dr,) = torch.autograd.grad(total, raw)
    assert_close_to_reference(ce, want_ce.detach(), torch.float32, "ce")
    assert_close_to_reference(lse, want_lse.detach(), torch.float32, "lse")
    assert_close_to_reference(dr, want_dr, torch.float32, "dlogits")


# ---------------------------------------------------------------------------- fused vs full logits (CPU path)
@pytest.mark.parametrize("chunk_rows", [64, 5], ids=["1chunk", "8chunks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_fused_equals_full_logits(dtype, opt, reduction, chunk_rows):
    hidden, weight, bias, labels = _data(dtype=dtype)
    kw = dict(OPTIONS[opt], reduction=reduction)
    got = _fused(hidden, weight, bias, labels, chunk_bytes=chunk_rows * V * weight.element_size(), **kw)
    want = _reference(hidden, weight, bias, labels, **kw)
    policy = torch.float32  # float64 inputs: the strictest bound of the policy
    for name, g, w in zip(("loss", "z_loss", "dH", "dW", "db"), got, want):
        if name == "z_loss" and not kw.get("z_loss"):
            assert float(g) == 0.0
            continue
        assert_close_to_reference(g, w, policy, f"{name} [{opt}, {reduction}]")
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[2].dtype == dtype and got[3].dtype == dtype and got[4].dtype == dtype


def test_fused_matches_torch_cross_entropy_directly():
    """The plain case against torch's own F.cross_entropy on full fp32 logits (the loss users compute today)."""
    hidden, weight, _, labels = _data(bias=False)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    want = F.cross_entropy(h.double() @ w.double().t(), labels, ignore_index=-100)
    gh, gw = torch.autograd.grad(want, [h, w])
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = fused_linear_cross_entropy(h2, w2, labels, chunk_bytes=3 * V * 4)
    got.backward()
    assert_close_to_reference(got, want.detach(), torch.float32, "loss")
    assert_close_to_reference(h2.grad, gh, torch.float32, "dH")
    assert_close_to_reference(w2.grad, gw, torch.float32, "dW")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_head_on_the_cpu_path(dtype):
    """16-bit hidden and head: 16-bit logits and dlogits (fp16 stored x FP16_GRAD_SCALE), fp32 loss math."""
    hidden, weight, bias, labels = _data(dtype=dtype, seed=2)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction="mean")
    got = _fused(hidden, weight, bias, labels, chunk_bytes=6 * V * 2, **kw)
    want = _reference(hidden, weight, bias, labels, **kw)  # from the same rounded inputs
    for name, g, w in zip(("loss", "z_loss", "dH", "dW", "db"), got, want):
        assert_close_to_reference(g, w, dtype, name)
    assert FP16_GRAD_SCALE > 1


def test_fp32_head_under_bf16_autocast_uses_slices_of_w():
    """fp32 weights under bf16 autocast: computed in bf16 as F.linear would be, W cast slice by slice (never
    a whole bf16 copy of W), trainable weight and bias gradients in fp32."""
    hidden, weight, bias, labels = _data(v=301, seed=5)
    lin = torch.nn.Linear(H, 301)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    assert len(resolve_head(lin).slices(torch.bfloat16, 40 * H * 2)) == 8  # ragged: 7 x 40 rows + 21
    h = hidden.clone().requires_grad_(True)
    with AllocTracker() as tr, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, lin, labels, chunk_bytes=40 * H * 2)
    loss.backward()
    casts = [r for r in tr.records if "_to_copy" in r.op and r.dtype == torch.bfloat16 and r.shape[-1] == H]
    assert casts and max(r.numel for r in casts) <= 40 * H, casts[:3]  # slices of W, never all of it
    want = _reference(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels)
    for name, g, w in zip(("loss", "dH", "dW", "db"), (loss, h.grad, lin.weight.grad, lin.bias.grad),
                          (want[0], *want[2:])):
        assert_close_to_reference(g, w, torch.bfloat16, name)
    assert lin.weight.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


# ---------------------------------------------------------------------------- the Triton row kernel
def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


@needs_interpreter
@pytest.mark.parametrize("block_v,v", [(64, 150), (None, K.BLOCK_V + 53)], ids=["tiles64-v150", "default-v2101"])
@pytest.mark.parametrize("opt", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_row_kernel_against_reference(dtype, opt, block_v, v):
    g = torch.Generator().manual_seed(v)
    r = 6 if block_v is None else 9
    raw = (torch.randn(r, v, generator=g) * 4).to(dtype)
    labels = torch.randint(0, v, (r,), generator=g)
    labels[1] = -100
    labels[2] = v - 1  # the last column: in the ragged tail
    kw = OPTIONS[opt]
    want_ce, want_lse, want_dr = ce_rows_reference(raw, labels, **kw)
    # forward only: the logits stay as they were
    buf, loss, lse = raw.clone(), _nan(r), _nan(r)
    K.cross_entropy_rows_(buf, labels, loss, lse, write_grad=False, block_v=block_v, **kw)
    assert torch.equal(buf, raw)
    assert_close_to_reference(loss, want_ce, torch.float32, "ce")
    # with the gradient, in place and scaled
    buf, loss, lse = raw.clone(), _nan(r), _nan(r)
    K.cross_entropy_rows_(buf, labels, loss, lse, grad_scale=8.0, block_v=block_v, **kw)
    assert_close_to_reference(loss, want_ce, torch.float32, "ce")
    assert_close_to_reference(lse, want_lse, torch.float32, "lse")
    assert_close_to_reference(buf.double() / 8.0, want_dr, dtype, "dlogits")
    assert float(loss[1]) == 0.0 and float(lse[1]) == 0.0 and not buf[1].any()


@needs_interpreter
def test_row_kernel_bad_arguments():
    lg = torch.zeros(3, 10)
    lab, out = torch.zeros(3, dtype=torch.long), torch.zeros(3)
    with pytest.raises(TypeError, match="labels has dtype int32"):
        K.cross_entropy_rows_(lg, lab.int(), out, out.clone())
    with pytest.raises(ValueError, match=r"loss must have shape \(3,\)"):
        K.cross_entropy_rows_(lg, lab, torch.zeros(4), out)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        K.cross_entropy_rows_(torch.zeros(10, 3).t(), lab, out, out.clone())
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        K.cross_entropy_rows_(lg, lab, out, out.clone(), block_v=48)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_op_through_the_triton_kernel(dtype, monkeypatch):
    """The whole op with the row work in the Triton kernel (the CUDA path), several chunks."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    hidden, weight, bias, labels = _data(dtype=dtype, seed=7)
    kw = dict(OPTIONS["all"], reduction="sum")
    got = _fused(hidden, weight, bias, labels, chunk_bytes=9 * V * weight.element_size(), **kw)
    want = _reference(hidden, weight, bias, labels, **kw)
    for name, g, w in zip(("loss", "z_loss", "dH", "dW", "db"), got, want):
        assert_close_to_reference(g, w, dtype, name)


# ---------------------------------------------------------------------------- 4-bit head
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_4bit_head_against_float64_over_its_dequantized_weight(double_quant):
    v, h = 1100, 96  # H not a multiple of the blocksize: slices start on block / nested-group boundaries
    torch.manual_seed(0)
    dense = torch.nn.Linear(h, v)
    with torch.no_grad():
        dense.weight.mul_(8.0)
    head = Linear4bit.from_linear(dense, blocksize=64, double_quant=double_quant)
    head.bias.requires_grad_(True)
    assert not head.weight.requires_grad
    budget = 300 * h * 4  # W slices of <= 300 rows (rounded to the 4-bit unit)
    slices = resolve_head(head).slices(torch.float32, budget)
    assert len(slices) >= 3 and slices[-1][1] == v
    hidden, _, _, labels = _data(t=29, h=h, v=v, seed=1)
    x = hidden.clone().requires_grad_(True)
    kw = dict(label_smoothing=0.05, z_loss=1e-3, reduction="mean")
    with AllocTracker() as tr:
        loss = fused_linear_cross_entropy(x, head, labels, chunk_bytes=budget, **kw)
        loss.backward()
    tr.assert_below(v * h, what="4-bit head fwd+bwd (no whole dense W)")
    w64 = weight64(head)
    want = _reference(hidden, w64, head.bias.detach(), labels, **kw)
    assert_close_to_reference(loss, want[0], torch.float32, "loss")
    assert_close_to_reference(x.grad, want[2], torch.float32, "dH")
    assert_close_to_reference(head.bias.grad, want[4], torch.float32, "db")
    assert head.weight.grad is None


@needs_interpreter
def test_4bit_head_through_the_triton_kernels(monkeypatch):
    """The 4-bit matmul kernels (workspace path for > FUSED_MAX_M rows, fused tiles below) + the row kernel."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    v, h = 200, 64
    torch.manual_seed(1)
    head = Linear4bit.from_linear(torch.nn.Linear(h, v, bias=False), blocksize=64)
    hidden, _, _, labels = _data(t=80, h=h, v=v, seed=4, ignore_every=9)
    x = hidden.clone().requires_grad_(True)
    loss = fused_linear_cross_entropy(x, head, labels, chunk_bytes=40 * v * 4, softcap=3.0)  # chunks of 40 rows
    loss.backward()
    want = _reference(hidden, weight64(head), None, labels, softcap=3.0)
    assert_close_to_reference(loss, want[0], torch.float32, "loss")
    assert_close_to_reference(x.grad, want[2], torch.float32, "dH")


# ---------------------------------------------------------------------------- memory
def test_no_t_by_v_tensor_and_exact_saved_bytes():
    t, h, v = 96, 32, 1000
    hidden, weight, _, labels = _data(t=t, h=h, v=v, bias=False, seed=3, ignore_every=3)
    n = int((labels != -100).sum())
    x = hidden.clone().requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with AllocTracker() as tr, torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        loss = fused_linear_cross_entropy(x, weight, labels, chunk_bytes=8 * v * 4)  # frozen head
    loss.backward()
    tr.assert_below(16 * v, what="fused CE forward (chunks of 8 rows)")
    # saved for backward: dH of the valid rows (float32) and their row indices; no logits, nothing else
    real = [s for s in saved if s is not None]
    assert sorted((tuple(s.shape), s.dtype) for s in real) == [((n,), torch.int64), ((n, h), torch.float32)]
    assert sum(s.numel() * s.element_size() for s in real) == n * h * 4 + n * 8
    # the control: the full-logits loss does allocate [T, V]
    with AllocTracker() as full:
        F.cross_entropy(x @ weight.t(), labels)
    assert full.at_least(t * v)


def test_no_grad_skips_the_gradient_work():
    hidden, weight, _, labels = _data(bias=False)
    x = hidden.clone().requires_grad_(True)

    def mms(grad: bool) -> int:
        with AllocTracker() as tr, torch.set_grad_enabled(grad):
            loss = fused_linear_cross_entropy(x, weight, labels, chunk_bytes=5 * V * 4)
        assert loss.requires_grad == grad
        # dH = dlogits W: one [<= 5, H] product per chunk (the logits go into a reused buffer with out=,
        # which the tracker does not count as an allocation)
        return sum(1 for r in tr.records if r.op.startswith("aten.mm") and r.shape[-1] == H)

    chunks = math.ceil(int((labels != -100).sum()) / 5)
    assert mms(False) == 0
    assert mms(True) == chunks
    with torch.no_grad():
        a = fused_linear_cross_entropy(x, weight, labels)
    assert_close_to_reference(a, _reference(hidden, weight, None, labels)[0], torch.float32, "no-grad loss")


def test_head_logits_helper():
    hidden, weight, bias, _ = _data(t=5)
    got = head_logits(hidden, weight, bias=bias, softcap=2.0)
    want = reference.transform_logits(hidden.double() @ weight.double().t() + bias.double(), 2.0)
    assert_close_to_reference(got, want, torch.float32, "head_logits")


# ---------------------------------------------------------------------------- all masked, bad input
def test_all_labels_masked_gives_zero_loss_and_gradients():
    hidden, weight, bias, labels = _data()
    labels = torch.full_like(labels, -100)
    for reduction in ("mean", "sum"):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = _fused(hidden, weight, bias, labels, reduction=reduction, z_loss=1e-3)
        msgs = [str(w.message) for w in rec]
        assert any("every label is ignore_index" in m for m in msgs) == (reduction == "mean"), msgs
        loss, z, dh, dw, db = got
        assert float(loss) == 0.0 and float(z) == 0.0 and not torch.isnan(loss)
        for g in (dh, dw, db):
            assert g is not None and not g.any() and torch.isfinite(g).all()


def test_bad_input_errors():
    hidden, weight, bias, labels = _data()
    f = fused_linear_cross_entropy
    bad = labels.clone()
    bad[1] = 101
    with pytest.raises(ValueError, match=r"1 label\(s\) outside \[0, 101\).*e\.g\. 101"):
        f(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 101\).*e\.g\. -5"):
        f(hidden, weight, labels.masked_fill(torch.arange(T) == 2, -5))
    with pytest.raises(ValueError, match=r"hidden must be 2-D \[T, H\]"):
        f(hidden[None], weight, labels)
    with pytest.raises(ValueError, match=r"labels must be 1-D \[T\] with T = 37"):
        f(hidden, weight, labels[None])
    with pytest.raises(ValueError, match=r"labels must be 1-D \[T\] with T = 37"):
        f(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="hidden has 24 features but the head is \\[101, 25\\]"):
        f(hidden, torch.randn(V, H + 1), labels)
    with pytest.raises(TypeError, match="hidden must be float32/float16/bfloat16"):
        f(hidden.int(), weight, labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        f(hidden, weight, labels.float())
    with pytest.raises(TypeError, match="hidden is float32 but the head weight is float16"):
        f(hidden, weight.half(), labels)
    with pytest.raises(ValueError, match="must be on one device: hidden on cpu, labels on meta"):
        f(hidden, weight, labels.to("meta"))
    with pytest.raises(ValueError, match=r"the head bias must have shape \(101,\)"):
        f(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="the head weight must be a non-empty 2-D"):
        f(hidden, weight[None], labels)
    with pytest.raises(TypeError, match="head must be an nn.Linear, a peft_kernels.nn.Linear4bit or a weight"):
        f(hidden, torch.nn.Conv1d(H, V, 1), labels)
    with pytest.raises(ValueError, match="bias= is for a weight tensor"):
        f(hidden, torch.nn.Linear(H, V), labels, bias=bias)
    for kw, msg in (({"label_smoothing": 1.5}, "label_smoothing must be a number in"),
                    ({"softcap": -1.0}, "softcap must be None or a finite number > 0"),
                    ({"z_loss": float("nan")}, "z_loss must be a finite number >= 0"),
                    ({"logit_scale": 0.0}, "logit_scale must be a finite number > 0"),
                    ({"reduction": "none"}, "reduction must be one of"),
                    ({"chunk_bytes": 0}, "chunk_bytes must be a positive int")):
        with pytest.raises(ValueError, match=msg):
            f(hidden, weight, labels, **kw)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        f(hidden, weight, labels, ignore_index=-100.0)
