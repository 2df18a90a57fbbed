"""Fused RMSNorm, SwiGLU and RoPE: Triton kernels (interpreter) vs float64 references, the CPU path vs the
transformers modules (bit for bit), saved bytes, bad input."""
import pytest
import torch
from torch import nn

from _tolerance import assert_close_to_reference
from peft_kernels.kernels import rmsnorm as KR
from peft_kernels.kernels import rope as KP
from peft_kernels.kernels import swiglu as KS
from peft_kernels.ops import fused_layers as FL
from peft_kernels.ops import reference_fused as ref

DTYPES = (torch.float32, torch.float16)


@pytest.fixture
def triton_backend(monkeypatch):
    """Run the ops on the Triton kernels (interpreter on CPU), every launcher buffer poisoned with NaN."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for mod in (KR, KS):
        monkeypatch.setattr(mod, "_empty", nan_empty)
    real = torch.empty_like

    def nan_like(t, **kw):  # rope's output buffer
        return real(t, **kw).fill_(float("nan"))

    monkeypatch.setattr(KP.torch, "empty_like", nan_like)


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _grads(fn, inputs, dy):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*ins)
    gs = torch.autograd.grad(y, ins, dy)
    return y.detach(), gs


# ------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 40), (7, 72), (19, 130)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("w32", [False, True])
def test_rmsnorm_kernel_vs_float64(triton_backend, dtype, rows, n, gemma, w32):
    x = _rand(rows, n, dtype=dtype, seed=1, scale=3.0)
    w = _rand(n, dtype=torch.float32 if w32 else dtype, seed=2)
    out_dtype = dtype if gemma else torch.promote_types(w.dtype, dtype)
    dy = _rand(rows, n, dtype=out_dtype, seed=3)
    y, (dx, dw) = _grads(lambda a, b: FL.rms_norm(a, b, 1e-6, gemma), [x, w], dy)
    y64, (dx64, dw64) = _grads(lambda a, b: ref.rmsnorm_forward(a, b, 1e-6, gemma)[0], [x.double(), w.double()],
                               dy.double())
    assert y.dtype == out_dtype and dx.dtype == dtype and dw.dtype == w.dtype
    tol = torch.float16 if torch.float16 in (dtype, w.dtype) else torch.float32
    assert_close_to_reference(y, y64, tol, "y")
    assert_close_to_reference(dx, dx64, tol, "dx")
    assert_close_to_reference(dw, dw64, tol, "dw")


def test_rmsnorm_kernel_partial_sums_and_no_dw(triton_backend):
    """Several backward programs (each its own dW row) reduce to the one-program result; need_dw=False."""
    x, w, dy = _rand(37, 72, seed=4), _rand(72, seed=5), _rand(37, 72, seed=6)
    y, rstd = KR.rmsnorm_forward(x, w, 1e-5)
    dx1, dw1 = KR.rmsnorm_backward(dy, x, w, rstd, programs=1)
    dx5, dw5 = KR.rmsnorm_backward(dy, x, w, rstd, programs=5)
    assert torch.equal(dx1, dx5)
    assert_close_to_reference(dw5, dw1.double(), torch.float32, "dw")
    dx, dw = KR.rmsnorm_backward(dy, x, w, rstd, need_dw=False)
    assert dw is None and torch.equal(dx, dx1)
    # frozen weight through the op: no weight gradient computed or returned
    xr = x.clone().requires_grad_(True)
    FL.rms_norm(xr, w, 1e-5).backward(dy)
    assert w.grad is None and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_cpu_path_is_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    mod = LlamaRMSNorm(72, eps=1e-5).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(_rand(72, seed=7))
    x = _rand(2, 5, 72, dtype=dtype, seed=8, scale=2.0)
    assert torch.equal(FL.rms_norm(x, mod.weight, mod.variance_epsilon), mod(x))


def test_rmsnorm_cpu_path_is_gemma_rmsnorm():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    mod = GemmaRMSNorm(40, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        mod.weight.copy_(_rand(40, seed=9) * 0.1)
    x = _rand(3, 40, dtype=torch.bfloat16, seed=10)
    assert torch.equal(FL.rms_norm(x, mod.weight, mod.eps, gemma=True), mod(x))


def test_rmsnorm_gradients_vs_module_autograd():
    """Our closed-form backward (CPU path, fp32) against the transformers module's autograd in float64."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    mod = LlamaRMSNorm(72, eps=1e-6)
    with torch.no_grad():
        mod.weight.copy_(_rand(72, seed=11))
    x, dy = _rand(9, 72, seed=12, scale=2.0), _rand(9, 72, seed=13)
    _, (dx, dw) = _grads(lambda a, b: FL.rms_norm(a, b, 1e-6), [x, mod.weight], dy)
    m64 = LlamaRMSNorm(72, eps=1e-6).double()
    with torch.no_grad():
        m64.weight.copy_(mod.weight)
    x64 = x.double().requires_grad_(True)
    m64(x64).backward(dy.double())
    assert_close_to_reference(dx, x64.grad, torch.float32, "dx")
    assert_close_to_reference(dw, m64.weight.grad, torch.float32, "dw")


# ------------------------------------------------------------------ SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 72), (1500,)])
def test_swiglu_kernel_vs_float64(triton_backend, dtype, shape):
    g, u = _rand(*shape, dtype=dtype, seed=1, scale=3.0), _rand(*shape, dtype=dtype, seed=2)
    dy = _rand(*shape, dtype=dtype, seed=3)
    h, (dg, du) = _grads(FL.swiglu, [g, u], dy)
    h64, (dg64, du64) = _grads(ref.swiglu_forward, [g.double(), u.double()], dy.double())
    for name, got, want in (("h", h, h64), ("dgate", dg, dg64), ("dup", du, du64)):
        assert got.dtype == dtype
        assert_close_to_reference(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_cpu_path_is_llama_mlp_activation(dtype):
    from transformers.activations import ACT2FN
    g, u = _rand(4, 72, dtype=dtype, seed=4, scale=3.0), _rand(4, 72, dtype=dtype, seed=5)
    assert torch.equal(FL.swiglu(g, u), ACT2FN["silu"](g) * u)
    dy = _rand(4, 72, dtype=torch.float32, seed=6)
    _, (dg, du) = _grads(FL.swiglu, [g.float(), u.float()], dy)
    _, (dg64, du64) = _grads(lambda a, b: ACT2FN["silu"](a) * b, [g.double(), u.double()], dy.double())
    assert_close_to_reference(dg, dg64, torch.float32, "dgate")
    assert_close_to_reference(du, du64, torch.float32, "dup")


# ------------------------------------------------------------------ RoPE
def _cos_sin(bsz, seq, d, dtype, seed=0):
    # As transformers' rotary embedding builds them: cat(freqs, freqs), positions per batch row.
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.stack([torch.arange(seq, dtype=torch.float32) + 3 * b for b in range(bsz)])
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,heads,seq,d", [(1, 1, 1, 8), (2, 3, 19, 40), (1, 2, 33, 72)])
@pytest.mark.parametrize("layout", ["bhsd", "transposed", "bshd"])
def test_rope_kernel_vs_float64(triton_backend, dtype, bsz, heads, seq, d, layout):
    cos, sin = _cos_sin(bsz, seq, d, dtype)
    if layout == "bhsd":
        x, dim = _rand(bsz, heads, seq, d, dtype=dtype, seed=1), 1
    elif layout == "transposed":  # transformers' q/k: view(B, S, H, D).transpose(1, 2), not contiguous
        x, dim = _rand(bsz, seq, heads, d, dtype=dtype, seed=1).transpose(1, 2), 1
    else:
        x, dim = _rand(bsz, seq, heads, d, dtype=dtype, seed=1), 2
    dy = _rand(*x.shape, dtype=dtype, seed=2)
    y, (dx,) = _grads(lambda a: FL.rope(a, cos, sin, dim), [x], dy)
    y64, (dx64,) = _grads(lambda a: ref.rope_forward(a, cos.double(), sin.double(), dim), [x.double()], dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close_to_reference(y, y64, dtype, "y")
    assert_close_to_reference(dx, dx64, dtype, "dx")


def test_rope_kernel_batch_broadcast_cos(triton_backend):
    cos, sin = _cos_sin(1, 11, 40, torch.float32)
    x = _rand(3, 2, 11, 40, seed=3)
    assert_close_to_reference(FL.rope(x, cos, sin), ref.rope_forward(x.double(), cos.double(), sin.double()),
                              torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cpu_path_is_transformers_apply_rotary_pos_emb(dtype):
    from transformers.models.llama import modeling_llama as L
    cos, sin = _cos_sin(2, 7, 40, dtype)
    q = _rand(2, 7, 4, 40, dtype=dtype, seed=4).transpose(1, 2)
    k = _rand(2, 7, 2, 40, dtype=dtype, seed=5).transpose(1, 2)
    for got, want in zip(FL.apply_rotary_pos_emb(q, k, cos, sin), L.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ saved bytes
def _saved(fn, params=()):
    own = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_saved_bytes_exact(monkeypatch, backend_name):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    x = _rand(2, 5, 72, dtype=torch.float16, seed=1).requires_grad_(True)
    w = nn.Parameter(_rand(72, dtype=torch.float16, seed=2))
    # x itself (its storage, 2·5·72 fp16) + rstd (10 rows fp32); weight is a resident Parameter.
    assert _saved(lambda: FL.rms_norm(x, w, 1e-6), [w]) == 2 * 5 * 72 * 2 + 4 * 10
    g = _rand(3, 130, dtype=torch.float16, seed=3).requires_grad_(True)
    u = _rand(3, 130, dtype=torch.float16, seed=4).requires_grad_(True)
    assert _saved(lambda: FL.swiglu(g, u)) == 2 * 3 * 130 * 2  # gate and up, nothing else
    cos, sin = _cos_sin(1, 9, 40, torch.float16)
    q = _rand(1, 2, 9, 40, dtype=torch.float16, seed=5).requires_grad_(True)
    assert _saved(lambda: FL.rope(q, cos, sin)) == 2 * 9 * 40 * 2  # cos and sin only
    # transformers' own modules keep more: LlamaRMSNorm holds fp32 copies of x
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    mod = LlamaRMSNorm(72).half()
    assert _saved(lambda: mod(x), [mod.weight]) > 2 * 5 * 72 * 2 + 4 * 10


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_clearly(triton_backend):
    x, w = _rand(3, 40), _rand(40)
    with pytest.raises(ValueError, match="weight must be"):
        FL.rms_norm(x, _rand(41), 1e-6)
    with pytest.raises(TypeError, match="dtype int64"):
        FL.rms_norm(x.long(), w, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        FL.rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="one shape"):
        FL.swiglu(x, _rand(3, 41))
    with pytest.raises(TypeError, match="one dtype"):
        FL.swiglu(x, x.half())
    cos, sin = _cos_sin(1, 5, 40, torch.float32)
    with pytest.raises(ValueError, match="cos and sin must be"):
        FL.rope(_rand(1, 2, 6, 40), cos, sin)
    with pytest.raises(ValueError, match="even last dim"):
        FL.rope(_rand(1, 2, 5, 39), cos[..., :39], sin[..., :39])
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        FL.rope(_rand(1, 2, 5, 40), cos, sin, 3)
    with pytest.raises(ValueError, match="must not require grad"):
        FL.rope(_rand(1, 2, 5, 40), cos.requires_grad_(True), sin)
    with pytest.raises(ValueError, match="RMSNorm kernels take rows"):
        KR.rmsnorm_forward(_rand(1, KR.MAX_N + 1), _rand(KR.MAX_N + 1), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        KS.swiglu_forward(x.t(), x.t())


def test_non_contiguous_inputs_are_handled(triton_backend):
    """Non-contiguous x / gate / up run on a contiguous copy and give the contiguous result."""
    x = _rand(40, 6, seed=1).t()
    w = _rand(40, seed=2)
    assert torch.equal(FL.rms_norm(x, w, 1e-6), FL.rms_norm(x.contiguous(), w, 1e-6))
    g, u = _rand(40, 6, seed=3).t(), _rand(40, 6, seed=4).t()
    assert torch.equal(FL.swiglu(g, u), FL.swiglu(g.contiguous(), u.contiguous()))
