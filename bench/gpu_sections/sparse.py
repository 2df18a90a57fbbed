"""gpu_suite section h: sparse fine-tuning (a trainable sparse delta over a frozen 4-bit W).

Two tables:

1. ``sddmm``: the values' gradient ``(dYᵀ x)`` at the selected entries (``ops.sparse.sampled_grad``: the
   Triton SDDMM on a GPU) vs the dense baseline ``dYᵀ x`` (one cuBLAS GEMM, [N, K] output) followed by a
   gather of the selected entries / tiles, at densities 0.1 %, 1 % and 5 %, unstructured and block 16 / 32.
   Time, and the peak memory each allocates on top of what is already resident
   (``torch.cuda.max_memory_allocated`` delta around one call).
   Target: block-sparse >= 5x faster than the dense baseline.
2. ``layer``: one SparseLinear-equivalent step (``ops.sparse.sparse_linear_4bit`` forward + backward:
   y, dX, dvalues) at 1 % density, each layout, vs our LoRA r = 64 layer (``peft_kernels.nn.LoraLinear``
   over ``Linear4bit``: y, dX, dA, dB), both under autocast(bf16) with fp32 trainable parameters.
   Time and the peak memory of the step above the resident weights/parameters. Targets: sparse time
   <= 1.15x LoRA's; sparse peak <= LoRA's peak + the delta's bytes (values, indices) + its Adam state
   (2 fp32 moments per value) — reported as ``mem_budget_mib`` beside ``peak_mib``.

Full run: 4096 -> 14336, M = 8192, bf16. Dry run (CPU, reference backend): 128 -> 448, M = 48, fp16.
Every row is checked against a float32 dense reference (the dequantized W plus the masked dense Δ,
allowed here: this is a benchmark, not the layer) before it is timed.
"""
from __future__ import annotations

import torch

TITLE = "sparse fine-tuning: SDDMM values' gradient vs dense dYᵀX + gather; layer fwd+bwd vs LoRA r=64"

DENSITIES = (0.001, 0.01, 0.05)
LAYOUTS = (0, 16, 32)
LAYER_DENSITY = 0.01
LORA_R = 64
FULL_SHAPE = dict(m=8192, k=4096, n=14336)
DRY_SHAPE = dict(m=48, k=128, n=448)


def _layout_name(b: int) -> str:
    return "unstructured" if b == 0 else f"block{b}"


def _indices(n: int, k: int, b: int, density: float, dev, seed: int) -> torch.Tensor:
    from peft_kernels.ops.sparse import grid_size
    grid = grid_size(b, n, k)
    # density of Δ's elements; a block tile holds b*b of them
    count = max(1, round(density * grid))
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(grid, generator=g)[:count].sort().values.to(dev)


def _gather(full: torch.Tensor, idx: torch.Tensor, b: int, n: int, k: int) -> torch.Tensor:
    """Entries (unstructured) or b x b tiles of a dense [N, K] tensor at idx, zero outside [N, K]."""
    if b == 0:
        return full.reshape(-1)[idx]
    nbn, nbk = -(-n // b), -(-k // b)
    padded = torch.nn.functional.pad(full, (0, nbk * b - k, 0, nbn * b - n))
    tiles = padded.view(nbn, b, nbk, b).permute(0, 2, 1, 3).reshape(nbn * nbk, b, b)
    return tiles[idx]


def _peak_mib(dev, fn) -> float | None:
    """MiB allocated at the peak of one ``fn()`` call above what was allocated before it (CUDA only)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    out = None
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return peak / 2 ** 20


# ------------------------------------------------------------------ table 1: SDDMM vs dense + gather
def _sddmm_rows(b, shape: dict, dtype, dev) -> list[dict]:
    from peft_kernels.ops import sparse as S
    m, n, k = shape["m"], shape["n"], shape["k"]
    rows = []
    x = torch.randn(m, k, device=dev, dtype=dtype)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    full_ref = dy.float().t() @ x.float()  # the float32 reference of every entry (benchmark only)
    for layout in LAYOUTS:
        for density in DENSITIES:
            if b.out_of_time():
                break
            idx = _indices(n, k, layout, density, dev, seed=int(density * 1e5) + layout)
            ref = _gather(full_ref, idx, layout, n, k)
            base = {"table": "sddmm", "layout": _layout_name(layout), "density": density, "m": m, "n": n, "k": k,
                    "nnz_elems": idx.numel() * max(1, layout) ** 2, "dtype": str(dtype).replace("torch.", "")}

            def ours(idx=idx, layout=layout):
                return S.sampled_grad(dy, x, idx, layout, n, k)

            def dense(idx=idx, layout=layout):
                return _gather(dy.t() @ x, idx, layout, n, k)

            def check(out, ref=ref):
                return {"rel_err_grad": b.rel_err(out, ref)}

            for impl, fn, flops in (("sampled", ours, 2.0 * m * idx.numel() * max(1, layout) ** 2),
                                    ("dense+gather", dense, 2.0 * m * n * k)):
                row = b.row(dict(base, impl=impl), fn, check, tol=b.tol[dtype], flops=flops)
                if row.get("status") == "ok":
                    row["peak_mib"] = _peak_mib(dev, fn)
                rows.append(row)
            del ref
    del full_ref
    return rows


# ------------------------------------------------------------------ table 2: the layer vs LoRA r=64
def _layer_rows(b, shape: dict, dtype, dev) -> list[dict]:
    from peft_kernels.nn import Linear4bit
    from peft_kernels.ops import reference, reference_sparse
    from peft_kernels.ops import sparse as S
    m, n, k = shape["m"], shape["n"], shape["k"]
    dense = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    base4 = Linear4bit.from_linear(dense)
    del dense
    qs = base4.quant_state
    nest = qs.nested
    q4 = (base4.weight, qs.absmax, qs.code, nest.absmax if nest else None, nest.code if nest else None,
          nest.offset if nest else 0.0, qs.blocksize, n)
    w_q = reference.dequantize_4bit(base4.weight, qs.absmax_float(), qs.code, qs.blocksize, n * k,
                                    torch.float32).view(n, k)
    x = torch.randn(m, k, device=dev, dtype=dtype).requires_grad_(True)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    xf, dyf = x.detach().float(), dy.float()
    base_ref_y, base_ref_dx = xf @ w_q.t(), dyf @ w_q
    rows = []
    dt = str(dtype).replace("torch.", "")

    # LoRA r=64 over the same 4-bit base (the baseline of the time and memory targets)
    lora_peak = None
    try:
        from peft_kernels.nn import LoraLinear
        lora = LoraLinear(base4, "default", r=LORA_R, lora_alpha=2 * LORA_R).train()
        la, lb = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        with torch.no_grad():
            lb.normal_(0, 0.02)  # non-zero B: the LoRA term is part of what is checked
        s = lora.scaling["default"]
        xa, dyb = xf @ la.detach().t(), dyf @ lb.detach()
        lref = {"y": base_ref_y + s * xa @ lb.detach().t(), "dx": base_ref_dx + s * dyb @ la.detach(),
                "dA": s * dyb.t() @ xf, "dB": s * dyf.t() @ xa}

        def lora_step():
            with torch.autocast(dev.type, dtype=dtype):
                y = lora(x)
            return (y, *torch.autograd.grad(y, (x, la, lb), dy))

        def lora_check(o, lref=lref):
            return {f"rel_err_{key}": b.rel_err(t, lref[key]) for key, t in zip(("y", "dx", "dA", "dB"), o)}
        row = b.row({"table": "layer", "impl": f"lora_r{LORA_R}", "layout": "-", "density": None, "m": m, "n": n,
                     "k": k, "dtype": dt}, lora_step, lora_check, tol=b.tol[dtype],
                    flops=4.0 * m * n * k + 6.0 * m * LORA_R * (n + k))
        if row.get("status") == "ok":
            lora_peak = row["peak_mib"] = _peak_mib(dev, lora_step)
        rows.append(row)
        del lref, xa, dyb
    except ImportError as e:
        rows.append({"table": "layer", "impl": f"lora_r{LORA_R}", "status": "skip",
                     "note": f"peft_kernels.nn.LoraLinear not importable: {e}"})

    for layout in LAYOUTS:
        if b.out_of_time():
            break
        idx = _indices(n, k, layout, LAYER_DENSITY, dev, seed=7 + layout)
        vals = (torch.randn(S._values_shape(idx.numel(), layout), device=dev) * 0.05).requires_grad_(True)
        delta = reference_sparse.masked_delta_dense_reference(vals.detach(), idx, layout, n, k, torch.float32)
        ref = {"y": base_ref_y + xf @ delta.t(), "dx": base_ref_dx + dyf @ delta,
               "dvalues": _gather(dyf.t() @ xf, idx, layout, n, k)}
        del delta

        def step(idx=idx, vals=vals, layout=layout):
            with torch.autocast(dev.type, dtype=dtype):
                y = S.sparse_linear_4bit(x, *q4, None, vals, idx, layout)
            return (y, *torch.autograd.grad(y, (x, vals), dy))

        def check(o, ref=ref):
            return {f"rel_err_{key}": b.rel_err(t, ref[key]) for key, t in zip(("y", "dx", "dvalues"), o)}
        # values + indices + two fp32 Adam moments per value
        delta_bytes = vals.numel() * 4 * 3 + idx.numel() * 8
        row = b.row({"table": "layer", "impl": "sparse", "layout": _layout_name(layout), "density": LAYER_DENSITY,
                     "m": m, "n": n, "k": k, "dtype": dt, "delta_mib": delta_bytes / 2 ** 20},
                    step, check, tol=b.tol[dtype], flops=4.0 * m * n * k + 6.0 * m * vals.numel())
        if row.get("status") == "ok":
            row["peak_mib"] = _peak_mib(dev, step)
            if lora_peak is not None:
                row["mem_budget_mib"] = lora_peak + delta_bytes / 2 ** 20
        rows.append(row)
        del ref, vals
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(b, cfg: dict, dry: bool) -> list[dict]:
    dev, dtype = b.device, cfg["dtype"]
    shape = DRY_SHAPE if dry else FULL_SHAPE
    rows = _sddmm_rows(b, shape, dtype, dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows + _layer_rows(b, shape, dtype, dev)


# ------------------------------------------------------------------ rendering
def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(rows: list[dict]) -> list[str]:
    lines = ["SDDMM (values' gradient at the selected entries) vs dense dYᵀX + gather:", "",
             "| layout | density | M | K->N | sampled ms | dense+gather ms | speed-up | sampled MiB | dense MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    pairs: dict = {}
    for r in rows:
        if r.get("table") == "sddmm":
            pairs.setdefault((r["layout"], r["density"], r["m"], r["k"], r["n"]), {})[r["impl"]] = r
    for (layout, density, m, k, n), d in pairs.items():
        s, g = d.get("sampled", {}), d.get("dense+gather", {})
        sm, gm = s.get("ms"), g.get("ms")
        speed = gm / sm if sm and gm and s.get("status") == g.get("status") == "ok" else None
        def cell(r, key, fmt):
            return _f(r.get(key), fmt) if r.get("status") == "ok" else r.get("status", "—")
        lines.append(f"| {layout} | {density:.1%} | {m} | {k}->{n} | {cell(s, 'ms', '.3f')} | "
                     f"{cell(g, 'ms', '.3f')} | {_f(speed, '.2f')}x | {cell(s, 'peak_mib', '.1f')} | "
                     f"{cell(g, 'peak_mib', '.1f')} |")
    lines += ["", f"Layer forward + backward at {LAYER_DENSITY:.0%} density vs LoRA r={LORA_R} "
              "(target: time <= 1.15x LoRA; peak <= LoRA peak + delta and its Adam state):", "",
              "| impl | layout | ms | vs LoRA | peak MiB | memory budget MiB | status |", "|---|---|---|---|---|---|---|"]
    lora_ms = next((r["ms"] for r in rows if r.get("table") == "layer" and r.get("impl", "").startswith("lora")
                    and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("table") != "layer":
            continue
        ok = r.get("status") == "ok"
        ratio = r["ms"] / lora_ms if ok and lora_ms else None
        lines.append(f"| {r['impl']} | {r.get('layout', '—')} | {_f(r.get('ms') if ok else None, '.3f')} | "
                     f"{_f(ratio, '.2f')}x | {_f(r.get('peak_mib'), '.1f')} | {_f(r.get('mem_budget_mib'), '.1f')} | "
                     f"{r.get('status')}{' (' + r['note'] + ')' if r.get('note') else ''} |")
    for r in rows:
        if r.get("table") is None:  # a setup error row from gpu_suite
            lines.append(f"- {r.get('impl')}: {r.get('status')} ({r.get('note', '')})")
    return lines
