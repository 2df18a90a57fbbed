"""SparseLinear: forward/backward against a float64 dense-masked-delta autograd reference (dense, Conv1D and
4-bit bases; unstructured and block layouts; ragged shapes), the grow hook, what autograd saves, no N*K
allocation, merge/unmerge, in-place swaps, bad input."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from _tolerance import assert_close_to_reference
from peft_kernels.nn.linear4bit import Linear4bit
from peft_kernels.nn.sparse import SparseLinear, element_coords
from peft_kernels.quant.quantize import quantize_4bit
from _weights import weight64

HAS_TRITON_SPARSE = importlib.util.find_spec("peft_kernels.kernels.sparse") is not None
N, K = 37, 45          # ragged: not a multiple of 16 or 32, N*K not a multiple of the 4-bit blocksize
NNZ = {0: 60, 16: 4, 32: 3}  # positions per layout (entries, or tiles of a 3x3 / 2x2 grid)


# ------------------------------------------------------------------ builders and the reference
def make_base(kind, k=K, n=N, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if kind == "linear":
        return lin.to(dtype)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        c = Conv1D(n, k)
        nn.init.normal_(c.weight, std=0.2)
        nn.init.normal_(c.bias, std=0.1)
        return c.to(dtype)
    return Linear4bit.from_linear(lin, blocksize=64).to(dtype)


def random_delta(n, k, block_size, nnz, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = n * k if block_size == 0 else -(-n // block_size) * -(-k // block_size)
    idx = torch.randperm(total, generator=g)[:nnz].sort().values
    shape = (nnz,) if block_size == 0 else (nnz, block_size, block_size)
    return idx, torch.randn(shape, generator=g) * 0.3


def make_layer(kind, block_size, dtype=torch.float32, bias=True, seed=0):
    base = make_base(kind, bias=bias, dtype=dtype, seed=seed)
    idx, vals = random_delta(N, K, block_size, NNZ[block_size], seed=seed + 1)
    return SparseLinear(base, idx, vals, block_size=block_size)


def base_w64(layer: SparseLinear) -> torch.Tensor:
    """The base W [N, K] in float64 as the layer computes with it (dequantized for 4-bit)."""
    return weight64(layer.base_layer)


def dense_delta64(indices, values64, block_size, n, k):
    """Δ [N, K] float64 built entry by entry in plain Python (independent of the library's index math);
    differentiable in ``values64``."""
    rows, cols, src = [], [], []
    if block_size == 0:
        for t, p in enumerate(indices.tolist()):
            rows.append(p // k)
            cols.append(p % k)
            src.append(t)
    else:
        b, gk = block_size, -(-k // block_size)
        for t, p in enumerate(indices.tolist()):
            bn, bk = divmod(p, gk)
            for i in range(b):
                for j in range(b):
                    if bn * b + i < n and bk * b + j < k:
                        rows.append(bn * b + i)
                        cols.append(bk * b + j)
                        src.append((t * b + i) * b + j)
    flat = values64.reshape(-1)[torch.tensor(src, dtype=torch.int64)]
    return torch.zeros(n, k, dtype=torch.float64).index_put((torch.tensor(rows), torch.tensor(cols)), flat)


class Ref:
    """y = x (W + Δ)ᵀ + b in float64 with leaf copies of the delta values and bias."""

    def __init__(self, layer: SparseLinear):
        self.layer = layer
        self.w = base_w64(layer)
        self.v = layer.delta_values.detach().double().requires_grad_()
        b = layer.base_layer.bias
        self.bias = None if b is None else b.detach().double().requires_grad_()

    def __call__(self, x64):
        lay = self.layer
        d = dense_delta64(lay.delta_indices, self.v, lay.block_size, lay.out_features, lay.in_features)
        y = x64 @ (self.w + d).t()
        return y if self.bias is None else y + self.bias


def check_against_reference(layer, x, dtype, what=""):
    """Forward + backward of ``layer`` vs :class:`Ref`; returns the reference (for extra checks)."""
    layer.delta_values.grad = None
    ref = Ref(layer)
    y = layer(x)
    assert y.shape == (*x.shape[:-1], layer.out_features)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    assert_close_to_reference(y, y64, dtype, f"y{what}")
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    assert_close_to_reference(x.grad, x64.grad, dtype, f"dx{what}")
    assert layer.delta_values.grad.dtype == layer.delta_values.dtype
    assert_close_to_reference(layer.delta_values.grad, ref.v.grad, dtype, f"d values{what}")
    bias = layer.base_layer.bias
    if bias is not None and bias.requires_grad:
        assert_close_to_reference(bias.grad, ref.bias.grad, dtype, f"d bias{what}")
    return ref


# ------------------------------------------------------------------ math
@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
@pytest.mark.parametrize("block_size,dtype", [(0, torch.float32), (16, torch.float32), (32, torch.float32),
                                              (0, torch.float16), (16, torch.float16)], ids=str)
def test_forward_backward_match_float64_reference(kind, block_size, dtype):
    layer = make_layer(kind, block_size, dtype)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, K, dtype=dtype, requires_grad=True)
    check_against_reference(layer, x, dtype)
    assert layer.delta_values.dtype == torch.float32
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_no_bias_single_row_and_ragged_tile_gradient_is_zero(kind):
    layer = make_layer(kind, 16, bias=False)
    x = torch.randn(1, K, requires_grad=True)  # M = 1
    check_against_reference(layer, x, torch.float32)
    # Elements of edge tiles that fall outside [N, K] are never used: their gradient is exactly 0.
    _, _, which = element_coords(layer.delta_indices, 16, N, K)
    outside = torch.ones(layer.delta_values.numel(), dtype=torch.bool)
    outside[which] = False
    assert outside.any()
    assert torch.all(layer.delta_values.grad.reshape(-1)[outside] == 0)


def test_unsorted_indices_are_sorted_with_their_values():
    base = make_base("linear")
    idx = torch.tensor([40, 3, 1000, 7])
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    layer = SparseLinear(base, idx, vals)
    assert layer.delta_indices.tolist() == [3, 7, 40, 1000]
    assert layer.delta_values.tolist() == [2.0, 4.0, 1.0, 3.0]
    x = torch.randn(3, K, requires_grad=True)
    check_against_reference(layer, x, torch.float32)


def test_zero_initialised_delta_is_the_base():
    base = make_base("conv1d")
    layer = SparseLinear(base, torch.tensor([0, 5, 99]))
    assert torch.count_nonzero(layer.delta_values) == 0
    x = torch.randn(4, K)
    assert torch.equal(layer(x), base(x))


def test_from_mask_matches_indices():
    base = make_base("linear")
    mask = torch.zeros(N, K, dtype=torch.bool)
    mask[3, 4] = mask[0, 0] = mask[36, 44] = True
    layer = SparseLinear.from_mask(base, mask)
    assert layer.delta_indices.tolist() == [0, 3 * K + 4, 36 * K + 44]
    tiles = torch.zeros(3, 3, dtype=torch.bool)
    tiles[2, 1] = True
    layer = SparseLinear.from_mask(base, tiles, block_size=16)
    assert layer.delta_indices.tolist() == [2 * 3 + 1] and layer.delta_values.shape == (1, 16, 16)


# ------------------------------------------------------------------ grow hook
@pytest.mark.parametrize("kind,block_size", [("linear", 0), ("4bit", 16)])
def test_grow_hook_accumulates_signed_gradient_at_candidates(kind, block_size):
    layer = make_layer(kind, block_size)
    total = N * K if block_size == 0 else 9
    cand = torch.tensor([p for p in range(total) if p not in set(layer.delta_indices.tolist())][::3][:5])
    layer.set_grow_candidates_(cand)
    ref_sum = torch.zeros(N, K, dtype=torch.float64)
    for _ in range(2):  # accumulated over two backwards
        x, dy = torch.randn(3, K), torch.randn(3, N)
        layer(x).backward(dy)
        ref_sum += dy.double().t() @ x.double()  # the dense gradient dL/dΔ (reference only)
    want = torch.zeros(layer.grow_scores.shape, dtype=torch.float64)
    r, c, which = element_coords(cand, block_size, N, K)
    if which is None:
        want = ref_sum[r, c]
    else:
        want.view(-1)[which] = ref_sum[r, c]
    assert layer.grow_scores.dtype == torch.float32
    assert_close_to_reference(layer.grow_scores, want, torch.float32, "grow scores")
    # No scoring under no_grad, nor once candidates are cleared.
    before = layer.grow_scores.clone()
    with torch.no_grad():
        layer(torch.randn(2, K))
    assert torch.equal(layer.grow_scores, before)
    layer.clear_grow_candidates_()
    assert layer.grow_scores is None and layer.grow_indices is None


def test_grow_candidates_must_be_disjoint_sorted_and_in_range():
    layer = make_layer("linear", 0)
    taken = int(layer.delta_indices[0])
    with pytest.raises(ValueError, match="already selected"):
        layer.set_grow_candidates_(torch.tensor([taken]))
    with pytest.raises(ValueError, match="out of range"):
        layer.set_grow_candidates_(torch.tensor([N * K]))
    with pytest.raises(ValueError, match="duplicate"):
        layer.set_grow_candidates_(torch.tensor([1, 1]) + (taken + 1 if taken < 5 else 0))


# ------------------------------------------------------------------ memory
def _saved_new_bytes(layer, x):
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return [t for t in saved if t.untyped_storage().data_ptr() not in own]


@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
@pytest.mark.parametrize("block_size", [0, 16])
def test_autograd_saves_only_x(kind, block_size):
    layer = make_layer(kind, block_size)
    x = torch.randn(5, K, requires_grad=True)
    new = _saved_new_bytes(layer, x)
    assert len(new) == 1 and new[0].data_ptr() == x.data_ptr() and new[0].nbytes == x.nbytes


@pytest.fixture
def alloc_tracker():
    return pytest.importorskip("_alloc_tracker", reason="tests/_alloc_tracker.py (sparse-kernels helper) missing")


@pytest.mark.parametrize("kind", ["linear", "4bit"])
@pytest.mark.parametrize("block_size", [0, 16])
def test_no_n_by_k_tensor_in_forward_or_backward(kind, block_size, alloc_tracker):
    n, k = 96, 80  # N*K = 7680; x/dy/dx are [4, 80]/[4, 96]
    base = make_base(kind, k=k, n=n)
    nnz = 70 if block_size == 0 else 6
    idx, vals = random_delta(n, k, block_size, nnz)
    layer = SparseLinear(base, idx, vals, block_size=block_size)
    layer.base_layer.bias.requires_grad_(True)
    total = n * k if block_size == 0 else 30
    free = [p for p in range(total) if p not in set(idx.tolist())]
    layer.set_grow_candidates_(torch.tensor(free[:: max(1, len(free) // 20)]))
    x = torch.randn(4, k, requires_grad=True)
    with alloc_tracker.AllocTracker() as tr:
        y = layer(x)
        y.square().sum().backward()
    assert layer.delta_values.grad is not None and x.grad is not None
    tr.assert_below(n * k, what=f"SparseLinear over {kind}, block_size={block_size}, forward+backward")
    assert tr.largest().numel >= 4 * max(n, k)  # the [M, N] / [M, K] outputs themselves were seen


# ------------------------------------------------------------------ in-place swaps
def test_set_delta_keeps_storage_and_checks_before_writing():
    layer = make_layer("linear", 0)
    p, buf = layer.delta_values, layer.delta_indices
    ptr_v, ptr_i = p.data_ptr(), buf.data_ptr()
    idx, vals = random_delta(N, K, 0, NNZ[0], seed=9)
    layer.set_delta_(idx, vals)
    assert layer.delta_values is p and p.data_ptr() == ptr_v and layer.delta_indices.data_ptr() == ptr_i
    assert torch.equal(layer.delta_indices, idx) and torch.equal(p.detach(), vals)
    snapshot = (layer.delta_indices.clone(), p.detach().clone())
    with pytest.raises(ValueError, match="shape"):
        layer.set_delta_(idx, torch.randn(NNZ[0] + 1))
    with pytest.raises(ValueError, match="NaN"):
        layer.set_delta_(idx, torch.full((NNZ[0],), float("nan")))
    assert torch.equal(layer.delta_indices, snapshot[0]) and torch.equal(p.detach(), snapshot[1])
    # A different nnz re-points the same Parameter object.
    layer.set_delta_(torch.tensor([1, 2, 3]))
    assert layer.delta_values is p and p.shape == (3,) and layer.nnz == 3
    x = torch.randn(2, K, requires_grad=True)
    check_against_reference(layer, x, torch.float32)


# ------------------------------------------------------------------ merge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("block_size,dtype", [(0, torch.float32), (16, torch.float16), (32, torch.float32)], ids=str)
def test_merge_dense_exact_and_unmerge_restores(kind, block_size, dtype):
    layer = make_layer(kind, block_size, dtype)
    x = torch.randn(3, K, dtype=dtype)
    y_sparse = layer(x).detach()
    w0 = layer._dense_weight().detach().clone()
    d64 = dense_delta64(layer.delta_indices, layer.delta_values.detach().double(), block_size, N, K)
    layer.merge()
    assert layer.merged
    assert torch.equal(layer._dense_weight(), (w0.double() + d64).to(dtype)), "merged W != round(W + Δ)"
    assert torch.equal(layer(x), layer.base_layer(x))
    assert_close_to_reference(layer(x), y_sparse.double(), dtype, "merged forward")
    layer.unmerge()
    assert torch.equal(layer._dense_weight(), w0) and not layer.merged
    assert torch.equal(layer(x), y_sparse)


@pytest.mark.parametrize("block_size", [0, 16])
def test_merge_4bit_dequantize_holds_what_was_trained(block_size):
    layer = make_layer("4bit", block_size)
    x = torch.randn(3, K)
    y_sparse = layer(x).detach()
    w_deq = layer.base_layer.dequantize(torch.float32)
    d64 = dense_delta64(layer.delta_indices, layer.delta_values.detach().double(), block_size, N, K)
    layer.merge(mode="dequantize")
    base = layer.base_layer
    assert type(base) is nn.Linear and base.weight.dtype == torch.float32 and not base.weight.requires_grad
    assert torch.equal(base.weight, (w_deq.double() + d64).float())
    assert_close_to_reference(layer(x), y_sparse.double(), torch.float32, "merged forward")
    layer.unmerge()  # back to dequant(W4) as a dense layer
    assert torch.equal(layer.base_layer.weight, w_deq)


def test_merge_4bit_requantize_bytes_and_refuses_unmerge():
    layer = make_layer("4bit", 0)
    qb = layer.base_layer
    w_sum = (qb.dequantize(torch.float32).double()
             + dense_delta64(layer.delta_indices, layer.delta_values.detach().double(), 0, N, K)).float()
    packed, state = quantize_4bit(w_sum, qb.blocksize, qb.quant_type, qb.double_quant)
    layer.merge(mode="requantize")
    assert layer.base_layer is qb and isinstance(qb, Linear4bit)
    assert torch.equal(qb.weight.reshape(-1), packed.reshape(-1))
    assert torch.equal(qb.quant_state.absmax, state.absmax)
    with pytest.raises(ValueError, match="requantize"):
        layer.unmerge()


def test_merge_mode_errors():
    layer = make_layer("4bit", 0)
    with pytest.raises(ValueError, match="cannot be merged exactly"):
        layer.merge()
    with pytest.raises(ValueError, match="merge mode"):
        layer.merge(mode="fast")
    assert not layer.merged


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("indices,values,block_size,err,match", [
    (torch.tensor([1.0, 2.0]), None, 0, TypeError, "int64"),
    (torch.tensor([[1, 2]]), None, 0, ValueError, "1-D"),
    (torch.tensor([], dtype=torch.int64), None, 0, ValueError, "empty"),
    (torch.tensor([0, N * K]), None, 0, ValueError, "out of range"),
    (torch.tensor([-1, 5]), None, 0, ValueError, "out of range"),
    (torch.tensor([4, 9, 4]), None, 0, ValueError, "duplicate"),
    (torch.tensor([0, 9]), None, 16, ValueError, "out of range"),          # 3x3 tile grid
    (torch.tensor([1, 2]), torch.randn(3), 0, ValueError, "shape"),
    (torch.tensor([1, 2]), torch.randn(2), 16, ValueError, "shape"),
    (torch.tensor([1, 2]), torch.tensor([1, 2]), 0, TypeError, "float"),
    (torch.tensor([1, 2]), None, 8, ValueError, "block_size"),
    ([1, 2], None, 0, TypeError, "torch.Tensor"),
])
def test_bad_delta_is_a_clear_error(indices, values, block_size, err, match):
    with pytest.raises(err, match=match):
        SparseLinear(make_base("linear"), indices, values, block_size=block_size)


def test_bad_mask_base_and_input():
    base = make_base("linear")
    with pytest.raises(ValueError, match=r"mask has shape \(45, 37\), expected \(37, 45\)"):
        SparseLinear.from_mask(base, torch.ones(K, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        SparseLinear.from_mask(base, torch.ones(N, K, dtype=torch.bool), block_size=16)
    with pytest.raises(TypeError, match="bool"):
        SparseLinear.from_mask(base, torch.ones(N, K))
    with pytest.raises(ValueError, match="no entries"):
        SparseLinear.from_mask(base, torch.zeros(N, K, dtype=torch.bool))
    with pytest.raises(TypeError, match="SparseLinear wraps"):
        SparseLinear(nn.Conv2d(3, 3, 1), torch.tensor([0]))
    layer = SparseLinear(base, torch.tensor([0]))
    with pytest.raises(ValueError, match="last dimension of x must be 45"):
        layer(torch.randn(2, K + 1))
    with pytest.raises(TypeError, match="float"):
        layer(torch.ones(2, K, dtype=torch.int64))


# ------------------------------------------------------------------ Triton path (interpreter)
@pytest.mark.skipif(not HAS_TRITON_SPARSE, reason="peft_kernels/kernels/sparse.py not present")
@pytest.mark.parametrize("kind,block_size", [("linear", 0), ("4bit", 16)])
def test_triton_path_matches_reference(kind, block_size, monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    layer = make_layer(kind, block_size)
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, K, requires_grad=True)
    check_against_reference(layer, x, torch.float32, " (triton)")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "conv1d", "4bit"])
@pytest.mark.parametrize("block_size", [0, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_layer_matches_reference(kind, block_size, dtype):
    """The layer on a GPU (Triton kernels), 16-bit inputs, against the float64 reference on the CPU."""
    layer = make_layer(kind, block_size, dtype).cuda()
    layer.base_layer.bias.requires_grad_(True)
    cpu = copy.deepcopy(layer).cpu()
    x = torch.randn(2, 3, K, dtype=dtype, device="cuda", requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = Ref(cpu)
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = ref(x64)
    y64.backward(dy.cpu().double())
    assert_close_to_reference(y.cpu(), y64, dtype, "y (cuda)")
    assert_close_to_reference(x.grad.cpu(), x64.grad, dtype, "dx (cuda)")
    assert_close_to_reference(layer.delta_values.grad.cpu(), ref.v.grad, dtype, "d values (cuda)")
    assert_close_to_reference(layer.base_layer.bias.grad.cpu(), ref.bias.grad, dtype, "d bias (cuda)")


def test_deepcopy_and_state_dict_round_trip():
    layer = make_layer("conv1d", 16)
    sd = layer.state_dict()
    assert {"delta_indices", "delta_values"} <= set(sd) and "grow_scores" not in sd
    other = SparseLinear(copy.deepcopy(layer.base_layer), layer.delta_indices.clone(), block_size=16)
    other.load_state_dict(sd)
    x = torch.randn(2, K)
    assert torch.equal(other(x), layer(x))
