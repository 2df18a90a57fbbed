"""Helpers shared by the C-library tests (CUDA and CPU): random 4-bit weights and bit-exact comparison."""
import torch

#: Integer views used to compare float outputs bit for bit.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def random_weight(numel, blocksize, seed):
    """Random packed bytes uint8 [(numel+1)//2, 1] and float32 absmax spanning five decades."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, generator=g)
    nblocks = -(-numel // blocksize)
    absmax = torch.rand(nblocks, generator=g) * torch.logspace(-3, 2, nblocks)  # varied magnitudes
    return packed, absmax


def assert_bit_exact(got, want):
    """Same dtype, shape and bits; NaN only where the expected output has NaN (poisoned outputs fail)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN in different places (or unwritten poisoned outputs)"
    diff = (got.view(INT_VIEW[got.dtype]) != want.view(INT_VIEW[want.dtype])) & ~nan
    idx = diff.nonzero()
    assert idx.numel() == 0, f"{idx.numel()} elements differ, first at {idx[:5].flatten().tolist()}"
