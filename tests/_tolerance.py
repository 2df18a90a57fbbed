"""The project's one tolerance policy (DESIGN.md): relative Frobenius error against a float64 reference.

Every kernel and layer test compares with ``assert_close_to_reference``; a case
never gets its own looser bound.
"""
import torch

#: Maximum relative Frobenius error ||got - ref|| / ||ref|| per compute dtype.
REL_TOL = {torch.float32: 1e-5, "tf32": 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got64, ref64 = got.detach().double(), ref.detach().double()
    denom = ref64.norm().item()
    err = (got64 - ref64).norm().item()
    return err / denom if denom > 0 else err


def assert_close_to_reference(got: torch.Tensor, ref: torch.Tensor, dtype, what: str = "output") -> None:
    """NaN/inf never pass (also catches poisoned, unwritten outputs); then the policy's bound for ``dtype``."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: contains NaN/inf (unwritten or overflowed elements)"
    err = rel_error(got, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.0e} for {dtype}"
