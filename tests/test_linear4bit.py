"""Linear4bit: math against a float64 reference, saved bytes, torch.library/compile, bnb interop, bad input."""
import pytest
import torch
from torch import nn

from _tolerance import assert_close_to_reference
from peft_kernels.nn import Linear4bit
from peft_kernels.ops.linear4bit import dequantize_4bit_op, linear4bit_grad_input_op, linear4bit_op
from _weights import weight64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [((1, 33), 17, 64), ((2, 5, 65), 31, 32), ((7, 100), 48, 4096)],
                         ids=["M1", "3d-ragged", "bs4096"])
def test_forward_backward_match_float64_reference(dtype, bias, shape):
    x_shape, n_out, blocksize = shape
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(x_shape[-1], n_out, bias=bias), blocksize=blocksize).to(dtype)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n_out)
    w64 = weight64(layer)
    x64 = x.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_() if bias else None
    y64 = nn.functional.linear(x64, w64, b64)
    assert_close_to_reference(y, y64, dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(x.grad, x64.grad, dtype, "dx")
    if bias:
        assert_close_to_reference(layer.bias.grad, b64.grad, dtype, "db")
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_backward_saves_no_input_and_no_dequantized_weight():
    layer = Linear4bit.from_linear(nn.Linear(256, 128))
    x = torch.randn(16, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    qs = layer.quant_state
    buffers = [layer.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code]
    # Exactly the quantized weight's own tensors, by identity: no copy, nothing of x, no dense W.
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in buffers)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert saved_bytes == (256 * 128 // 2) + (256 * 128 // 64) + 4 * (-(-512 // 256)) + 16 * 4 + 256 * 4
    y.sum().backward()
    assert x.grad is not None


def _op_args(layer, x):
    qs = layer.quant_state
    return (x, layer.weight, qs.absmax, qs.code, qs.nested.absmax, qs.nested.code, qs.nested.offset,
            qs.blocksize)


def test_torch_library_opcheck():
    layer = Linear4bit.from_linear(nn.Linear(40, 24))
    x = torch.randn(3, 40, requires_grad=True)
    args = _op_args(layer, x)
    torch.library.opcheck(linear4bit_op, (*args, 24, layer.bias))
    torch.library.opcheck(linear4bit_op, (*args, 24, None))
    dy = torch.randn(3, 24)
    torch.library.opcheck(linear4bit_grad_input_op, (dy, *args[1:], 40))
    torch.library.opcheck(dequantize_4bit_op, (*args[1:], 40 * 24, torch.float16))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(32, 48)), nn.GELU(),
                          Linear4bit.from_linear(nn.Linear(48, 16)))
    x = torch.randn(4, 32, requires_grad=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = x.grad.clone()
    x.grad = None
    y_e = model(x)
    y_e.sum().backward()
    assert_close_to_reference(y_c, y_e.double(), torch.float32, "compiled y")
    assert_close_to_reference(g_c, x.grad.double(), torch.float32, "compiled dx")


def test_state_dict_round_trip_and_dense_load_quantizes():
    dense = nn.Linear(70, 30)
    layer = Linear4bit.from_linear(dense, blocksize=32)
    sd = layer.state_dict()
    assert {"weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"} <= set(sd)
    other = Linear4bit(70, 30, blocksize=128)  # a different blocksize is adopted from the checkpoint
    other.load_state_dict(sd)
    assert other.blocksize == 32 and torch.equal(other.weight, layer.weight)
    x = torch.randn(2, 70)
    assert torch.equal(other(x), layer(x))
    fresh = Linear4bit(70, 30, blocksize=32)
    fresh.load_state_dict(dense.state_dict())  # dense weight -> quantized on load
    assert torch.equal(fresh.weight, layer.weight)


def test_load_state_dict_for_another_shape_is_a_clear_error():
    sd = Linear4bit.from_linear(nn.Linear(70, 30)).state_dict()
    with pytest.raises(RuntimeError, match=r"\(30, 70\) weight but this layer is \[20, 70\]"):
        Linear4bit(70, 20).load_state_dict(sd)


def test_from_bnb_reuses_bytes_and_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    bl = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    bl.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    bl.bias = nn.Parameter(dense.bias.detach().clone())
    bl = bl.to("cpu")  # quantizes on the move (bitsandbytes semantics)
    assert bl.weight.quant_state is not None
    ours = Linear4bit.from_bnb(bl)
    assert ours.weight.data_ptr() == bl.weight.data_ptr()  # the same bytes, not a copy
    assert torch.equal(ours.weight, Linear4bit.from_linear(dense).weight)  # and what we would have written
    x = torch.randn(3, 128)
    bl.train()  # bnb repacks its CPU weights in place after an eval-mode forward (DESIGN.md)
    assert_close_to_reference(ours(x), bl(x).double(), torch.float32, "vs bitsandbytes")


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    layer = Linear4bit.from_linear(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"last dimension of x must be 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        layer(torch.randn(0, 16))
    with pytest.raises(ValueError, match="same device"):
        layer(torch.randn(2, 16, device="meta"))
    from peft_kernels.ops import linear_4bit
    with pytest.raises(ValueError, match="contiguous"):
        linear_4bit(torch.randn(16, 2).t(), layer.weight, layer.quant_state)
    # The module accepts strided input like nn.Linear does.
    xt = torch.randn(16, 2).t()
    assert torch.equal(layer(xt), layer(xt.contiguous()))
    with pytest.raises(ValueError, match="blocksize 100"):
        Linear4bit(16, 8, blocksize=100)
    with pytest.raises(ValueError, match="does not match its bytes"):
        linear_4bit(torch.randn(2, 16), layer.weight[:-1], layer.quant_state)


# ------------------------------------------------- the Triton path end to end
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)  # no bf16 math in the interpreter
def test_triton_backend_through_the_module_matches_reference(monkeypatch, dtype):
    """Linear4bit -> torch.library op -> Triton kernels (interpreter on CPU), forward and backward."""
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    torch.manual_seed(1)
    layer = Linear4bit.from_linear(nn.Linear(65, 33), blocksize=32).to(dtype)  # odd K, blocks cross rows
    x = torch.randn(3, 65, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = nn.functional.linear(x64, weight64(layer), layer.bias.detach().double())
    y64.backward(dy.double())
    assert_close_to_reference(y, y64, dtype, "triton y")
    assert_close_to_reference(x.grad, x64.grad, dtype, "triton dx")
    assert_close_to_reference(layer.dequantize(torch.float32), weight64(layer), torch.float32, "triton dequant")
