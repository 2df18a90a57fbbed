"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

The interpreter forgives what a GPU compile does not (dot dims < 16, dtype
mismatches in tl.dot, non-constexpr shapes, shared memory over a card's limit), so every
compiled form the launchers can request (each module's ``AOT_VARIANTS``) is
built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``
down to PTX; the PTX of 16-bit dots is checked for tensor-core instructions and
each kernel's shared memory against the per-block limit of its target.

``triton.compile`` refuses interpreted kernels, and TRITON_INTERPRET must be
unset before triton is imported, so the compiles run in one subprocess (run as
``python tests/test_triton_aot.py``) with a private, fresh Triton cache; the
results come back as JSON and are asserted per variant here.

Coverage plan (compile time is the budget, ~0.5-3 s per variant and target):
* sm_80: every variant (the mma.sync code path, shared by sm_86/sm_89);
* sm_90: every (kernel, config, dtype, K_ALIGNED) with one bias variant (the wgmma path);
* sm_86, sm_89: one variant per (kernel, dtype), the per-element any-K path with a bias.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPS = (80, 86, 89, 90)
#: Largest shared memory one block may use (opt-in maximum): a launch over it fails on that GPU.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: Parallel compile processes (2 by default: CI runners and this workplace have 2 cores).
JOBS = int(os.environ.get("PEFT_KERNELS_AOT_JOBS", "2"))


def _modules():
    """Every module of peft_kernels.kernels (new kernel files are picked up without editing this)."""
    import peft_kernels.kernels as pkg
    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def _jit_kernels(mod) -> set[str]:
    """Names of the @triton.jit kernels defined in ``mod`` (helpers called from kernels excluded)."""
    out = set()
    for name, obj in vars(mod).items():
        fn = getattr(obj, "fn", None)
        if (name.endswith("_kernel") and callable(fn) and getattr(fn, "__module__", None) == mod.__name__
                and type(obj).__name__ in ("JITFunction", "InterpretedFunction")):
            out.add(name)
    return out


def _all_variants():
    variants = [v for mod in _modules() for v in getattr(mod, "AOT_VARIANTS", ())]
    names = [v.name for v in variants]
    assert len(names) == len(set(names)), "AOT variant names must be unique"
    return variants


def _kernel_name(v) -> str:
    return getattr(v.kernel, "__name__", None) or v.kernel.fn.__name__


def plan() -> list[tuple[str, int]]:
    """(variant name, compute capability) pairs to compile; see the module docstring."""
    variants = _all_variants()
    jobs = [(v.name, 80) for v in variants]
    seen = set()
    for v in variants:
        cx = v.constexprs
        # sm_90: tile/dtype/path matter for wgmma selection; the bias dtype only touches the epilogue.
        bias_ptr = v.signature.get("bias_ptr")
        if "HAS_BIAS" in cx and not (cx["HAS_BIAS"] and bias_ptr == v.signature.get("x_ptr")):
            continue
        jobs.append((v.name, 90))
    for v in variants:
        key = (_kernel_name(v), v.meta.get("dtype", v.name))
        if v.constexprs.get("K_ALIGNED", False) or not v.constexprs.get("HAS_BIAS", True) or key in seen:
            continue
        seen.add(key)
        jobs += [(v.name, 86), (v.name, 89)]
    return jobs


# ------------------------------------------------------------------------- compile subprocess
def _init_worker():
    # PTX is what we check; skip ptxas (cubin), which would double the time. The hook exists in
    # triton >= 3.5; without it the full pipeline runs (slower, same checks).
    from triton import knobs
    if not hasattr(knobs.runtime, "add_stages_inspection_hook"):
        return

    def hook(backend=None, stages=None, options=None, language=None, capability=None):
        if stages is None:
            return ("peft-kernels-ptx-only", "1")
        stages["cubin"] = lambda src, metadata: b""

    knobs.runtime.add_stages_inspection_hook = hook


def _compile_one(job):
    name, cap = job
    import triton
    from triton.backends.compiler import GPUTarget
    v = {v.name: v for v in _all_variants()}[name]
    t0 = time.perf_counter()
    try:
        names = list(v.signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in v.divisible_by_16}
        src = triton.compiler.ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        ptx = compiled.asm.get("ptx", "")
        res = {"ok": True, "ptx_len": len(ptx), "mma": "mma.sync" in ptx or "wgmma" in ptx,
               "wgmma": "wgmma" in ptx, "smem": compiled.metadata.shared, "error": ""}
    except Exception as e:  # reported per variant by the test
        res = {"ok": False, "ptx_len": 0, "mma": False, "wgmma": False, "smem": 0,
               "error": f"{type(e).__name__}: {e}"[:2000]}
    res.update(name=name, cap=cap, seconds=round(time.perf_counter() - t0, 3))
    return res


def _main() -> None:
    import multiprocessing
    jobs = [tuple(j) for j in json.loads(sys.stdin.read())]
    # Heaviest first (fp32 FMA dots) so the two workers finish together.
    jobs.sort(key=lambda j: ("fp32" not in j[0], j))
    with multiprocessing.get_context("fork").Pool(max(1, JOBS), initializer=_init_worker) as pool:
        results = pool.map(_compile_one, jobs, chunksize=1)
    json.dump(results, sys.stdout)


# ------------------------------------------------------------------------------------ tests
_PLAN = plan()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # fresh: no stale hits
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(_PLAN), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}"
    results = {(r["name"], r["cap"]): r for r in json.loads(proc.stdout)}
    results["_wall"] = time.perf_counter() - t0
    return results


def test_plan_covers_every_kernel_and_variant():
    variants = _all_variants()
    # Every @triton.jit kernel of every kernels/ module has at least one AOT variant.
    found = 0
    for mod in _modules():
        kernels = _jit_kernels(mod)
        found += len(kernels)
        covered = {_kernel_name(v) for v in getattr(mod, "AOT_VARIANTS", ())}
        assert kernels <= covered, f"{mod.__name__}: kernels without AOT_VARIANTS entries: {kernels - covered}"
    assert found >= 4  # dequant, gemv, nt, nn
    planned = defaultdict(set)
    for name, cap in _PLAN:
        planned[cap].add(name)
    assert planned[80] == {v.name for v in variants}
    assert set(planned) == set(CAPS)
    # Every config each launcher can pick is among the variants.
    from peft_kernels.kernels import matmul4bit
    for cfg in matmul4bit.NT_CONFIGS + matmul4bit.NN_CONFIGS + (matmul4bit.GEMV_CONFIG,):
        assert any(v.meta.get("config") == cfg.name for v in variants), cfg.name


@pytest.mark.parametrize("name,cap", _PLAN, ids=[f"sm{c}-{n}" for n, c in _PLAN])
def test_compiles(compiled, name, cap):
    r = compiled[(name, cap)]
    assert r["ok"], f"{name} for sm_{cap}: {r['error']}"
    assert r["ptx_len"] > 0
    # The interpreter and the compile accept any shared-memory size; the launch on a card does not.
    assert r["smem"] <= SMEM_LIMIT[cap], \
        f"{name} needs {r['smem']} B of shared memory, sm_{cap} allows {SMEM_LIMIT[cap]}"
    v = {v.name: v for v in _all_variants()}[name]
    if v.expect_mma:
        assert r["mma"], f"{name} for sm_{cap}: 16-bit tl.dot without tensor-core mma in the PTX"
        if cap == 90 and v.constexprs.get("BLOCK_M", 0) >= 64:
            # Hopper: a 64-row tile is one warpgroup's wgmma; smaller M stays on mma.sync.
            assert r["wgmma"], f"{name} for sm_90: expected wgmma for a 64-row tile"


def test_every_planned_compile_reported(compiled):
    assert set(compiled) - {"_wall"} == set(_PLAN)
    # Shown with -s/-rA: keeps an eye on this file's time budget (~2 minutes).
    print(f"\nAOT: {len(_PLAN)} compiles in {compiled['_wall']:.1f} s with {JOBS} processes")


if __name__ == "__main__":
    _main()
