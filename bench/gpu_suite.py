#!/usr/bin/env python3
"""One-shot GPU table for peft_kernels: every number beside its baseline, measured in one run.

    python bench/gpu_suite.py [--out PATH] [--budget-s 240]      # on a CUDA machine
    python bench/gpu_suite.py --dry-run --out /tmp/gs             # CPU smoke run, tiny shapes

Sections (JSON keys):

* ``ceilings``: the card's device copy bandwidth (clone of a 1 GiB tensor,
  bytes read + written) and bf16 GEMM rate (8192^3) — what every other number is
  a fraction of.
* ``dequant`` (a): NF4 -> bf16 dequantization, 4096x4096 and 14336x4096, as GB/s
  of necessary traffic (packed + absmax read, output written) and % of the copy
  bandwidth. "kernel" rows take the float32 absmax already decoded (Triton, CUDA C,
  bitsandbytes' op, the torch reference); "full" rows include decoding the
  double-quantized absmax (ours through dispatch, bitsandbytes.functional).
* ``gemv_m1`` (c): M=1 forward (decode) as GB/s of weight read and % of copy
  bandwidth; also back-to-back microseconds per call, which includes host overhead.
* ``linear_fwd_bwd`` (b): forward + input gradient at M in {1,16,512,4096,8192},
  4096->4096 and 4096->14336, bf16: ours (``peft_kernels.nn.Linear4bit``) vs
  ``bitsandbytes.nn.Linear4bit`` vs dense ``nn.Linear`` with a frozen weight.
* ``crossover`` (d): the Triton fused kernels vs dequant-to-workspace + cuBLAS,
  each forced, forward and dX, M in {16..1024}: where ``FUSED_MAX_M`` belongs.
* ``lora_fwd_bwd`` (e): one LoRA linear layer, forward + dX, dA, dB, r in {8,16,64},
  the (b) shapes and Ms: ours (``nn.LoraLinear`` over ``nn.Linear4bit``) vs PEFT over
  ``bitsandbytes.nn.Linear4bit`` vs the dense limit (frozen dense W + plain torch
  LoRA, cuBLAS only); ``lora_summary``: ours/dense and peft/ours.
* ``decoder_layer`` (f): one Llama-3-8B-shaped ``LlamaDecoderLayer`` (random weights,
  seq 2048, batch 1), QLoRA r=16 on all 7 linear layers, forward + backward: ours
  (``quantize_model`` + ``methods.lora.apply``) vs PEFT + bitsandbytes;
  ``decoder_summary``: peft/ours.
* ``methods`` (g, h, i, ...): one section per PEFT method, each in its own module under
  ``bench/gpu_sections/`` (see :data:`METHOD_SECTIONS` and that package's docstring).

LoRA rows (e, f) run under ``torch.autocast`` to the suite dtype (as a Trainer with
bf16=True runs PEFT: its LoRA matmuls then run in bf16, its fastest mode), with
float32 adapter parameters (PEFT's default) for every implementation. Their check:
y, dX, dA, dB against a float32 reference from the same 4-bit bytes; for (f) a
float32 copy of the layer with the dequantized weights and PEFT LoRA over nn.Linear,
the 7 layers' dA (and dB) concatenated into one relative error.

Method. Every op is first checked against a float32 reference (TF32 off) built
from the same 4-bit bytes; a wrong result is recorded as FAIL and never timed.
Outputs are poisoned best-effort (a NaN block of the output's size is freed just
before the checked call, so the caching allocator hands it back and an unwritten
element shows as NaN). Timing: CUDA events around each call, warm-up first,
median of N reps (N chosen for ~0.25 s per row, 10..200). Before each rep a
buffer of max(256 MiB, 2x L2) is zeroed (L2 flush, on by default, --no-flush to
disable): the 4-bit weights of these shapes (8-30 MB) would otherwise sit in the
50 MB L2 and the decode rows would measure the cache; the flush also hides most
of the host's launch latency (host overhead shows in the back-to-back column).
Rows past ``--budget-s`` are skipped with a note. Missing bitsandbytes, Triton
kernels or CUDA C library -> those rows are skipped with a note.

Writes the JSON to ``--out`` (a file, or a directory that gets gpu_suite.json;
default ``$OUT/gpu_suite.json`` when $OUT is set, else ./gpu_suite.json) and the
markdown table beside it (gpu_suite.md), and prints the table last.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python bench/gpu_suite.py` from the repo root, package not installed
    sys.path.insert(0, REPO)

import torch  # noqa: E402  (torch does not import triton; bitsandbytes and our kernels do, later)

BLOCKSIZE = 64
#: Method sections: letter -> module name under bench/gpu_sections/ (each: TITLE, run(b, cfg, dry), render(rows)).
METHOD_SECTIONS = {"g": "bitfit", "h": "sparse", "i": "adapter", "j": "cross_entropy", "k": "fused",
                   "l": "memory_switches", "m": "decode", "n": "multi_lora", "o": "training_step"}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # DESIGN.md tolerance policy

FULL = dict(
    dtype=torch.bfloat16,
    copy_numel=1 << 28,  # fp32: 1 GiB
    gemm_n=8192,
    dequant_shapes=[(4096, 4096), (14336, 4096)],  # weight [N out, K in]
    linear_shapes=[(4096, 4096), (4096, 14336)],  # (K in, N out)
    ms=[1, 16, 512, 4096, 8192],
    crossover_ms=[16, 64, 128, 256, 512, 1024],
    lora_ranks=[16, 8, 64],  # the target's r first: a spent --budget-s drops the others
    lora_ms=[1, 16, 512, 4096, 8192],
    decoder=dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, seq=2048, batch=1, r=16),
)
# Dry run: same code paths at tiny sizes on CPU. fp16, because Triton's interpreter
# (--interpret) computes bf16 arithmetic wrongly; K divisible by the blocksize, because
# bitsandbytes 0.50.2's AVX-512 CPU dequant is wrong otherwise.
DRY = dict(
    dtype=torch.float16,
    copy_numel=1 << 20,
    gemm_n=128,
    dequant_shapes=[(128, 128), (448, 128)],
    linear_shapes=[(128, 128), (128, 448)],
    ms=[1, 16, 48],
    crossover_ms=[16, 80],
    lora_ranks=[16, 8, 64],
    lora_ms=[1, 48],
    decoder=dict(hidden=128, intermediate=448, heads=4, kv_heads=2, seq=64, batch=1, r=16),
)


# ------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (ref is float32); inf when out has NaN/inf or the wrong shape."""
    out = out.detach().reshape(-1).float()
    ref = ref.reshape(-1)
    if out.numel() != ref.numel() or not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def poison(device: torch.device, *specs: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Free NaN blocks of the given sizes so the next allocations of those sizes likely reuse them."""
    if device.type != "cuda":
        return  # the CPU allocator gives no such reuse; the dry run only smoke-tests
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=device) for shape, dtype in specs]
    del blocks


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Bench:
    """Timing and row bookkeeping shared by all sections."""

    def __init__(self, device: torch.device, *, flush: bool, budget_s: float, target_s: float,
                 min_reps: int, max_reps: int):
        self.device = device
        self.deadline = time.monotonic() + budget_s
        self.target_s, self.min_reps, self.max_reps = target_s, min_reps, max_reps
        self.flush_buf = None
        if flush and device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            self.flush_bytes = max(256 << 20, 2 * l2)
            self.flush_buf = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device=device)
        else:
            self.flush_bytes = 0
        self.skipped_for_time = 0

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def time(self, fn, flush: bool = True) -> dict:
        """Median/min/max milliseconds of ``fn()`` over N reps (after warm-up)."""
        dev = self.device
        # Warm-up and a rough per-call time to size N (the checked first call already compiled).
        t0 = time.perf_counter()
        n_warm = 0
        while n_warm < 3 or (time.perf_counter() - t0 < 0.02 and n_warm < 50):
            fn()
            n_warm += 1
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        est = (time.perf_counter() - t0) / n_warm
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s / max(est, 1e-6))))
        times = []
        if dev.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for i in range(reps):
                if flush and self.flush_buf is not None:
                    self.flush_buf.zero_()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize(dev)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        return {"ms": statistics.median(times), "ms_min": times[0], "ms_max": times[-1],
                "ms_p20": times[len(times) // 5], "ms_p80": times[(4 * len(times)) // 5], "reps": reps}

    def row(self, base: dict, fn, check, *, tol: float, nbytes: int | None = None, flops: float | None = None,
            poison_specs=(), flush: bool = True) -> dict:
        """Check ``fn`` (``check(out) -> {name: rel_err}``), then time it; a failed check is a FAIL row."""
        row = dict(base)
        if self.out_of_time():
            self.skipped_for_time += 1
            row.update(status="skip", note="time budget spent")
            return row
        try:
            poison(self.device, *poison_specs)
            t0 = time.perf_counter()
            out = fn()
            _sync(self.device)
            row["first_call_s"] = round(time.perf_counter() - t0, 4)  # includes JIT compile
            errs = check(out)
            del out
            row.update({k: v for k, v in errs.items()})
            if not all(e <= tol for e in errs.values()):  # NaN compares False: fails too
                row.update(status="FAIL", note=f"error above tolerance {tol:g}")
                return row
            row.update(self.time(fn, flush=flush))
            row["status"] = "ok"
            sec = row["ms"] / 1e3
            if nbytes is not None:
                row["bytes"] = nbytes
                row["gbps"] = nbytes / sec / 1e9
            if flops is not None:
                row["tflops"] = flops / sec / 1e12
        except Exception as e:  # one broken implementation must not sink the table
            row.update(status="error", note=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            row["traceback"] = traceback.format_exc(limit=4)
        return row


# What method sections (bench/gpu_sections/) use besides the Bench itself.
Bench.rel_err = staticmethod(lambda out, ref: rel_err(out, ref))
Bench.tol = TOL


def strict_json(obj):
    """Plain JSON: inf/NaN (failed checks) become strings, unknown objects their str()."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def skip_row(base: dict, note: str) -> dict:
    return dict(base, status="skip", note=note)


# ---------------------------------------------------------------- optional parts
class Parts:
    """What is available: bitsandbytes, our Triton kernels, the CUDA C library (with reasons)."""

    def __init__(self, device: torch.device, allow_triton: bool):
        self.notes: list[str] = []
        self.bnb = self.bnbF = None
        try:
            import bitsandbytes
            import bitsandbytes.functional
            self.bnb, self.bnbF = bitsandbytes, bitsandbytes.functional
        except Exception as e:
            self.notes.append(f"bitsandbytes not importable ({type(e).__name__}: {e}): bnb columns skipped")
        self.triton_dequant = self.triton_nt = self.matmul4bit = None
        self.triton_reason = None
        if not allow_triton:
            self.triton_reason = "no CUDA device (dry run without --interpret)"
        else:
            try:
                from peft_kernels.kernels.dequant4bit import dequantize_4bit
                from peft_kernels.kernels import matmul4bit
                self.triton_dequant, self.triton_nt = dequantize_4bit, matmul4bit.matmul_4bit_nt
                self.matmul4bit = matmul4bit
            except Exception as e:
                self.triton_reason = f"Triton kernels not importable ({type(e).__name__}: {e})"
        if self.triton_reason:
            self.notes.append(f"Triton kernel rows skipped: {self.triton_reason}")
        self.cuda_dequant = None
        self.cuda_reason = None
        try:  # loading needs no GPU, so the dry run still reports whether the library is there
            from peft_kernels.ops import cuda_lib
            if cuda_lib.load() is None:
                self.cuda_reason = cuda_lib.unavailable_reason()
            elif device.type != "cuda":
                self.cuda_reason = f"no CUDA device (library {cuda_lib.library_path().name} loads)"
            else:
                self.cuda_dequant = cuda_lib.dequantize_4bit_cuda
        except Exception as e:
            self.cuda_reason = f"cuda_lib not importable ({type(e).__name__}: {e})"
        if self.cuda_reason:
            self.notes.append(f"CUDA C library rows skipped: {self.cuda_reason}")


# ------------------------------------------------------------------ sections
def ceilings(b: Bench, cfg: dict) -> dict:
    """Device copy bandwidth and GEMM rate, measured on this card now."""
    dev = b.device
    out = {}
    src = torch.randn(cfg["copy_numel"], device=dev)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    out["copy"] = b.row({"what": f"clone {src.numel() * 4 >> 20} MiB fp32"}, lambda: src.clone(),
                        lambda o: {"rel_err": 0.0 if torch.equal(o, src) else float("inf")},
                        tol=0.0, nbytes=nbytes, flush=False)
    del src
    n = cfg["gemm_n"]
    gdt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=gdt)
    w = torch.randn(n, n, device=dev, dtype=gdt)
    ref = a[:256].float() @ w.float()  # a slice keeps the float32 check cheap
    out["gemm"] = b.row({"what": f"{n}^3 {str(gdt).replace('torch.', '')} torch.mm"}, lambda: a @ w,
                        lambda o: {"rel_err": rel_err(o[:256], ref)}, tol=TOL[gdt], flops=2.0 * n ** 3,
                        flush=False)
    del a, w, ref
    return out


def dequant_section(b: Bench, parts: Parts, cfg: dict) -> list[dict]:
    from peft_kernels.ops import reference
    from peft_kernels.ops.functional import dequantize
    from peft_kernels.quant import quantize_4bit

    dev, dtype = b.device, cfg["dtype"]
    rows = []
    for n, k in cfg["dequant_shapes"]:
        numel = n * k
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        packed, state = quantize_4bit(w, BLOCKSIZE, "nf4", True)
        absmax_f = state.absmax_float().contiguous()
        code = state.code
        ref = reference.dequantize_4bit(packed, absmax_f, code, BLOCKSIZE, numel, torch.float32)
        ref_cast = ref.to(dtype)
        out_bytes = numel * torch.tensor([], dtype=dtype).element_size()
        kernel_bytes = packed.numel() + absmax_f.numel() * 4 + out_bytes
        full_bytes = packed.numel() + state.storage_bytes() + out_bytes
        base = {"shape": [n, k], "dtype": str(dtype).replace("torch.", "")}

        def check(o):
            return {"rel_err": rel_err(o, ref)}

        def add(impl, level, fn, nbytes):
            row = b.row(dict(base, impl=impl, level=level), fn, check, tol=TOL[dtype], nbytes=nbytes,
                        poison_specs=[((numel,), dtype)])
            if row.get("status") == "ok":
                o = fn()
                row["bitexact_vs_reference"] = bool(torch.equal(o.reshape(-1), ref_cast))
            rows.append(row)

        # kernel level: float32 absmax given
        if parts.triton_dequant is not None:
            add("triton", "kernel", lambda: parts.triton_dequant(packed, absmax_f, code, BLOCKSIZE, numel, dtype),
                kernel_bytes)
        else:
            rows.append(skip_row(dict(base, impl="triton", level="kernel"), parts.triton_reason))
        if parts.cuda_dequant is not None:
            add("cuda_c", "kernel", lambda: parts.cuda_dequant(packed, absmax_f, code, BLOCKSIZE, numel, dtype),
                kernel_bytes)
        else:
            rows.append(skip_row(dict(base, impl="cuda_c", level="kernel"), parts.cuda_reason))
        if parts.bnb is not None:
            bpacked, bqs = parts.bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True,
                                                    quant_type="nf4")
            same = bool(torch.equal(bpacked.reshape(-1), packed.reshape(-1)))
            op = torch.ops.bitsandbytes.dequantize_4bit.default
            add("bnb", "kernel", lambda: op(bpacked, absmax_f, BLOCKSIZE, "nf4", [n, k], dtype), kernel_bytes)
            rows[-1]["bnb_bytes_equal_ours"] = same
        else:
            rows.append(skip_row(dict(base, impl="bnb", level="kernel"), "bitsandbytes not importable"))
        add("torch_reference", "kernel",
            lambda: reference.dequantize_4bit(packed, absmax_f, code, BLOCKSIZE, numel, dtype), kernel_bytes)
        # full path: double-quantized absmax decoded inside the call
        from peft_kernels.ops import backend
        add(f"ours({backend.select(dev, has_cuda_impl=True)})", "full", lambda: dequantize(packed, state, dtype),
            full_bytes)
        if parts.cuda_dequant is not None:
            def via_cuda():
                with env_var("PEFT_KERNELS_BACKEND", "cuda"):
                    return dequantize(packed, state, dtype)
            add("ours(cuda)", "full", via_cuda, full_bytes)
        if parts.bnb is not None:
            add("bnb", "full", lambda: parts.bnbF.dequantize_4bit(bpacked, bqs), full_bytes)
            del bpacked, bqs
        del w, packed, state, absmax_f, ref, ref_cast
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def build_layers(parts: Parts, k: int, n: int, dtype: torch.dtype, dev: torch.device) -> dict:
    """Dense (frozen), ours and bnb layers over one weight; the 4-bit ones hold identical bytes."""
    from peft_kernels.nn import Linear4bit
    from peft_kernels.ops import reference

    dense = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    dense.weight.requires_grad_(False)
    ours = Linear4bit.from_linear(dense)
    qs = ours.quant_state
    w_q = reference.dequantize_4bit(ours.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                    torch.float32).view(n, k)
    layers = {"dense": (dense, dense.weight.float()), "ours": (ours, w_q)}
    info = {"ours_weight_bytes": ours.weight.numel() + qs.storage_bytes(), "ours_absmax_f32": qs.absmax_float(),
            "ours_packed": ours.weight, "ours_code": qs.code, "ours_w_ref": w_q}
    if parts.bnb is not None:
        # Supported route: load the dense weight, then .to(device) quantizes it. Train mode:
        # bnb repacks CPU weights in place after an eval-mode forward (matters for the dry run).
        bl = parts.bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True,
                                     quant_type="nf4", device=dev)
        bl.load_state_dict(dense.state_dict())
        bl = bl.to(dev)
        bl.train()
        info["bnb_bytes_equal_ours"] = bool(torch.equal(bl.weight.data.reshape(-1), ours.weight.reshape(-1)))
        layers["bnb"] = (bl, w_q)
    return layers, info


def gemv_rows(b: Bench, parts: Parts, layers: dict, info: dict, k: int, n: int, dtype, copy_gbps) -> list[dict]:
    """M=1 forward (no grad): GB/s of weight read, % of copy bandwidth, back-to-back us/call."""
    dev = b.device
    esz = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(1, k, device=dev, dtype=dtype)
    io_bytes = (k + n) * esz
    rows = []
    base = {"k": k, "n": n, "m": 1, "dtype": str(dtype).replace("torch.", "")}
    w_q = layers["ours"][1]
    ref_q = x.float() @ w_q.t()
    candidates = [("ours", "module", layers["ours"][0], info["ours_weight_bytes"], ref_q)]
    if parts.triton_nt is not None:
        a, p, c = info["ours_absmax_f32"], info["ours_packed"], info["ours_code"]
        kern = (lambda: parts.triton_nt(x, p, a, c, BLOCKSIZE, n))
        candidates.append(("triton", "kernel", kern, p.numel() + a.numel() * 4, ref_q))
    else:
        rows.append(skip_row(dict(base, impl="triton", level="kernel"), parts.triton_reason))
    if "bnb" in layers:
        bl = layers["bnb"][0]
        candidates.append(("bnb", "module", bl, info["ours_weight_bytes"], ref_q))
    else:
        rows.append(skip_row(dict(base, impl="bnb", level="module"), "bitsandbytes not importable"))
    dense, w_d = layers["dense"]
    candidates.append(("dense", "module", dense, n * k * esz, x.float() @ w_d.t()))
    for impl, level, mod, wbytes, ref in candidates:
        fn = (lambda mod=mod: mod(x)) if level == "module" else mod

        def run(fn=fn):
            with torch.no_grad():
                return fn()
        row = b.row(dict(base, impl=impl, level=level, weight_bytes=wbytes), run,
                    lambda o, ref=ref: {"rel_err_y": rel_err(o, ref)}, tol=TOL[dtype], nbytes=wbytes + io_bytes,
                    poison_specs=[((1, n), dtype)])
        if row.get("status") == "ok":
            if copy_gbps:
                row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
            # Back-to-back calls without a sync: the decode rate a user sees, host overhead included.
            reps = 200 if dev.type == "cuda" else 5
            _sync(dev)
            t = time.perf_counter()
            for _ in range(reps):
                run()
            _sync(dev)
            row["back_to_back_us"] = (time.perf_counter() - t) / reps * 1e6
        rows.append(row)
    return rows


def linear_rows(b: Bench, layers: dict, k: int, n: int, ms: list[int], dtype) -> list[dict]:
    """Forward + input gradient (dX only: the weight is frozen) for each M and implementation."""
    dev = b.device
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=dtype).requires_grad_(True)
        dy = torch.randn(m, n, device=dev, dtype=dtype)
        for impl in ("ours", "bnb", "dense"):
            base = {"k": k, "n": n, "m": m, "impl": impl, "dtype": str(dtype).replace("torch.", "")}
            if impl not in layers:
                rows.append(skip_row(base, "bitsandbytes not importable"))
                continue
            layer, w_ref = layers[impl]
            ref_y = x.detach().float() @ w_ref.t()
            ref_dx = dy.float() @ w_ref

            def step(layer=layer):
                y = layer(x)
                (dx,) = torch.autograd.grad(y, x, dy)  # no accumulation into x.grad
                return y, dx

            rows.append(b.row(base, step,
                              lambda o, ry=ref_y, rdx=ref_dx: {"rel_err_y": rel_err(o[0], ry),
                                                               "rel_err_dx": rel_err(o[1], rdx)},
                              tol=TOL[dtype], flops=4.0 * m * n * k,
                              poison_specs=[((m, n), dtype), ((m, k), dtype)]))
            del ref_y, ref_dx
        del x, dy
    return rows


def crossover_rows(b: Bench, parts: Parts, info: dict, k: int, n: int, ms: list[int], dtype) -> list[dict]:
    """(d) Triton fused kernel vs dequant-to-workspace + cuBLAS, both forced, per M: where the
    automatic switch (``matmul4bit.FUSED_MAX_M``) should sit. Forward (nt) and dX (nn)."""
    dev = b.device
    rows = []
    if parts.matmul4bit is None:
        return [skip_row({"k": k, "n": n}, parts.triton_reason)]
    mm = parts.matmul4bit
    a, p, c = info["ours_absmax_f32"], info["ours_packed"], info["ours_code"]
    w_q = info["ours_w_ref"]
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=dtype)
        dy = torch.randn(m, n, device=dev, dtype=dtype)
        ref_y, ref_dx = x.float() @ w_q.t(), dy.float() @ w_q

        def ws_nt():
            return x @ parts.triton_dequant(p, a, c, BLOCKSIZE, n * k, dtype).view(n, k).t()

        def ws_nn():
            return dy @ parts.triton_dequant(p, a, c, BLOCKSIZE, n * k, dtype).view(n, k)
        try:
            cfg_nt = mm.pick_nt_config(m, n, dev).name
            cfg_nn = mm.pick_nn_config(m, k, dev).name
        except Exception as e:
            rows.append(skip_row({"k": k, "n": n, "m": m}, f"no config picker: {type(e).__name__}: {e}"))
            continue
        cases = [
            ("nt", "fused", lambda cfg=cfg_nt: mm.matmul_4bit_nt(x, p, a, c, BLOCKSIZE, n, config=cfg), ref_y,
             (m, n), cfg_nt),
            ("nt", "workspace", ws_nt, ref_y, (m, n), None),
            ("nn", "fused", lambda cfg=cfg_nn: mm.matmul_4bit_nn(dy, p, a, c, BLOCKSIZE, k, config=cfg), ref_dx,
             (m, k), cfg_nn),
            ("nn", "workspace", ws_nn, ref_dx, (m, k), None),
        ]
        for kern, path, fn, ref, oshape, cfg in cases:
            base = {"k": k, "n": n, "m": m, "kernel": kern, "path": path, "config": cfg,
                    "auto_path": "fused" if m <= getattr(mm, "FUSED_MAX_M", 0) else "workspace"}
            rows.append(b.row(base, fn, lambda o, ref=ref: {"rel_err": rel_err(o, ref)}, tol=TOL[dtype],
                              flops=2.0 * m * n * k, poison_specs=[(oshape, dtype)]))
        del x, dy, ref_y, ref_dx
    return rows


def linear_summary(rows: list[dict]) -> list[dict]:
    """One line per (k, n, m): dense/ours/bnb ms and the ratios ours/dense and bnb/ours."""
    table: dict = {}
    for r in rows:
        key = (r["k"], r["n"], r["m"])
        table.setdefault(key, {})[r["impl"]] = r
    out = []
    for (k, n, m), d in table.items():
        ms = {i: d[i]["ms"] for i in d if d[i].get("status") == "ok"}
        s = {"k": k, "n": n, "m": m, **{f"{i}_ms": v for i, v in ms.items()}}
        if "ours" in ms and "dense" in ms:
            s["ours_over_dense"] = ms["ours"] / ms["dense"]
        if "ours" in ms and "bnb" in ms:
            s["bnb_over_ours"] = ms["bnb"] / ms["ours"]
        out.append(s)
    return out


# ------------------------------------------------------------------ LoRA sections (e, f)
class LoraParts:
    """What the LoRA sections need beyond ``Parts``: our LoRA modules, PEFT, transformers (with reasons)."""

    def __init__(self):
        self.notes: list[str] = []
        self.versions: dict = {}
        self.LoraLinear = self.apply = self.LoraConfig = self.quantize_model = None
        self.peft = self.llama = None
        try:
            from peft_kernels.nn import LoraLinear
            self.LoraLinear = LoraLinear
        except Exception as e:
            self.notes.append(f"peft_kernels.nn.LoraLinear not importable ({type(e).__name__}: {e}): "
                              "LoRA 'ours' rows skipped")
        try:
            from peft_kernels.methods import lora as methods_lora
            from peft_kernels.quant import quantize_model
            self.apply, self.LoraConfig, self.quantize_model = (methods_lora.apply, methods_lora.LoraConfig,
                                                                quantize_model)
        except Exception as e:
            self.notes.append(f"peft_kernels.methods.lora / quantize_model not importable ({type(e).__name__}: "
                              f"{e}): decoder-layer 'ours' row skipped")
        try:
            import peft
            self.peft = peft
            self.versions["peft"] = peft.__version__
        except Exception as e:
            self.notes.append(f"peft not importable ({type(e).__name__}: {e}): PEFT columns skipped")
        try:
            import transformers
            from transformers.models.llama import modeling_llama
            self.llama = (transformers.LlamaConfig, modeling_llama.LlamaDecoderLayer,
                          modeling_llama.LlamaRotaryEmbedding)
            self.versions["transformers"] = transformers.__version__
        except Exception as e:
            self.notes.append(f"transformers' Llama not importable ({type(e).__name__}: {e}): section (f) skipped")


class _PeftHolder(torch.nn.Module):
    """A minimal model for ``peft.get_peft_model``: the wrapped module as child ``inner``."""

    def __init__(self, inner: torch.nn.Module, loaded_in_4bit: bool):
        super().__init__()
        self.inner = inner
        # PEFT reads this to swap bitsandbytes 4-bit layers for its bnb LoRA layer (as for a 4-bit HF model).
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _peft_wrap(lp: LoraParts, module: torch.nn.Module, targets: list[str], r: int, alpha: float,
               loaded_in_4bit: bool):
    """PEFT LoRA (default init, fp32 adapters) over ``module``; returns (peft model, the wrapped module)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = lp.peft.get_peft_model(_PeftHolder(module, loaded_in_4bit),
                                    lp.peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    return pm, pm.base_model.model.inner


def _bnb_linear4bit(parts: Parts, dense: torch.nn.Linear, dtype, dev):
    """bitsandbytes' Linear4bit over the same weight (the supported route: load, then .to() quantizes)."""
    bl = parts.bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                 compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device=dev)
    bl.load_state_dict(dense.state_dict())
    bl = bl.to(dev)
    bl.train()  # CPU (dry run): an eval-mode forward would repack the weight
    return bl


def _lora_ab(r: int, k: int, n: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 A [r, K] in PEFT's Kaiming-uniform range and a non-zero B [N, r] sized so the LoRA term is
    about as large as the base one (PEFT's zero B would leave the LoRA path unchecked)."""
    a = (torch.rand(r, k, device=dev) * 2 - 1) / k ** 0.5
    b = torch.randn(n, r, device=dev) / (2 * r ** 0.5)
    return a, b


def lora_section(b: Bench, parts: Parts, lp: LoraParts, cfg: dict) -> list[dict]:
    """(e) One LoRA linear layer, forward + backward (dX, dA, dB) under autocast to ``cfg['dtype']``:
    ours (LoraLinear over Linear4bit) vs PEFT over bitsandbytes.nn.Linear4bit vs the dense limit (frozen
    dense W, plain torch LoRA: cuBLAS only). Ranks in cfg order (the target's r first, so a spent
    budget drops the others)."""
    import torch.nn.functional as F
    from peft_kernels.nn import Linear4bit
    from peft_kernels.ops import reference

    dev, dtype = b.device, cfg["dtype"]
    rows: list[dict] = []
    bases = {}
    for k, n in cfg["linear_shapes"]:
        dense = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
        dense.weight.requires_grad_(False)
        ours = Linear4bit.from_linear(dense)
        qs = ours.quant_state
        w_q = reference.dequantize_4bit(ours.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                        torch.float32).view(n, k)
        bl, why = None, "bitsandbytes not importable"
        if parts.bnb is not None:
            bl = _bnb_linear4bit(parts, dense, dtype, dev)
            if not torch.equal(bl.weight.data.reshape(-1), ours.weight.reshape(-1)):
                bl, why = None, "bitsandbytes quantized to different bytes than ours"  # w_q would be wrong
        if lp.peft is None:
            bl, why = None, "peft not importable"
        bases[(k, n)] = (dense, ours, bl, w_q, dense.weight.float(), why)
    for r in cfg["lora_ranks"]:
        alpha = 2 * r
        s = alpha / r
        # Largest shape first (the target's): rows past --budget-s are skipped in this order.
        for (k, n), (dense, ours_base, bl, w_q, w_d32, why) in reversed(list(bases.items())):
            a, bm = _lora_ab(r, k, n, dev)
            impls, missing = {}, {}
            if lp.LoraLinear is not None:
                mod = lp.LoraLinear(ours_base, "default", r=r, lora_alpha=alpha).train()
                with torch.no_grad():
                    mod.lora_A["default"].weight.copy_(a)
                    mod.lora_B["default"].weight.copy_(bm)
                impls["ours"] = (mod, mod.lora_A["default"].weight, mod.lora_B["default"].weight, w_q)
            else:
                missing["ours"] = "peft_kernels.nn.LoraLinear not importable"
            if bl is None:
                missing["peft"] = why
            else:
                pm, pl = _peft_wrap(lp, bl, ["inner"], r, alpha, loaded_in_4bit=True)
                with torch.no_grad():
                    pl.lora_A["default"].weight.copy_(a)
                    pl.lora_B["default"].weight.copy_(bm)
                impls["peft"] = (pm.train(), pl.lora_A["default"].weight, pl.lora_B["default"].weight, w_q)
                if type(pl).__module__ != "peft.tuners.lora.bnb":
                    missing["peft"] = f"PEFT chose {type(pl).__name__}, not its bitsandbytes 4-bit layer"
                    del impls["peft"]
            a_d, b_d = a.clone().requires_grad_(True), bm.clone().requires_grad_(True)

            def dense_limit(x, a_d=a_d, b_d=b_d, w_d=dense.weight, s=s):
                return F.linear(x, w_d) + s * F.linear(F.linear(x, a_d), b_d)
            impls["dense"] = (dense_limit, a_d, b_d, w_d32)
            for m in cfg["lora_ms"]:
                x = torch.randn(m, k, device=dev, dtype=dtype).requires_grad_(True)
                dy = torch.randn(m, n, device=dev, dtype=dtype)
                xf, dyf = x.detach().float(), dy.float()
                xa, dyb = xf @ a.t(), dyf @ bm
                ref_lora = {"dA": s * dyb.t() @ xf, "dB": s * dyf.t() @ xa}
                lora_y, lora_dx = s * xa @ bm.t(), s * dyb @ a
                refs = {}  # per reference weight (ours and PEFT share the dequantized one)
                for impl in ("ours", "peft", "dense"):
                    base = {"k": k, "n": n, "m": m, "r": r, "impl": impl, "dtype": str(dtype).replace("torch.", "")}
                    if impl in missing:
                        rows.append(skip_row(base, missing[impl]))
                        continue
                    fn, pa, pb, w_ref = impls[impl]
                    if id(w_ref) not in refs:
                        refs[id(w_ref)] = dict(ref_lora, y=xf @ w_ref.t() + lora_y, dx=dyf @ w_ref + lora_dx)
                    ref = refs[id(w_ref)]

                    def step(fn=fn, pa=pa, pb=pb):
                        with torch.autocast(dev.type, dtype=dtype):
                            y = fn(x)
                        return (y, *torch.autograd.grad(y, (x, pa, pb), dy))  # no accumulation into .grad

                    def check(o, ref=ref):
                        return {f"rel_err_{key}": rel_err(t, ref[key]) for key, t in zip(("y", "dx", "dA", "dB"), o)}
                    rows.append(b.row(base, step, check, tol=TOL[dtype],
                                      flops=4.0 * m * n * k + 6.0 * m * r * (n + k),
                                      poison_specs=[((m, n), dtype), ((m, k), dtype)]))
                    del ref
                del x, dy, xf, dyf, xa, dyb, ref_lora, lora_y, lora_dx, refs
            del impls
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def lora_summary(rows: list[dict]) -> list[dict]:
    """One line per (k, n, r, m): ms per implementation, ours/dense and peft/ours."""
    table: dict = {}
    for r in rows:
        table.setdefault((r["k"], r["n"], r["r"], r["m"]), {})[r["impl"]] = r
    out = []
    for (k, n, rank, m), d in sorted(table.items()):
        ms = {i: d[i]["ms"] for i in d if d[i].get("status") == "ok"}
        s = {"k": k, "n": n, "r": rank, "m": m, **{f"{i}_ms": v for i, v in ms.items()}}
        if "ours" in ms and "dense" in ms:
            s["ours_over_dense"] = ms["ours"] / ms["dense"]
        if "ours" in ms and "peft" in ms:
            s["peft_over_ours"] = ms["peft"] / ms["ours"]
        out.append(s)
    return out


def decoder_section(b: Bench, parts: Parts, lp: LoraParts, cfg: dict) -> list[dict]:
    """(f) One Llama-3-8B-shaped decoder layer (random weights), QLoRA on all 7 linear layers, forward +
    backward (dX and every adapter gradient) under autocast: ours (quantize_model + methods.lora.apply)
    vs PEFT over bitsandbytes 4-bit layers holding the same bytes. Both are checked against a float32 copy
    of the layer whose linear weights are the dequantized 4-bit ones (PEFT LoRA over nn.Linear, float32)."""
    import copy

    dev, dtype, spec = b.device, cfg["dtype"], cfg["decoder"]
    base = {"what": "LlamaDecoderLayer", **{k: spec[k] for k in ("hidden", "intermediate", "heads", "kv_heads",
                                                                 "seq", "batch", "r")},
            "dtype": str(dtype).replace("torch.", "")}
    if lp.llama is None or lp.peft is None:
        why = "transformers' Llama not importable" if lp.llama is None else "peft not importable (no reference)"
        return [skip_row(dict(base, impl=i), why) for i in ("ours", "peft")]
    LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding = lp.llama
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    r = spec["r"]
    alpha = 2 * r
    lcfg = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                       num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], num_hidden_layers=1,
                       vocab_size=128, max_position_embeddings=spec["seq"])
    lcfg._attn_implementation = "sdpa"  # causal without a mask; same kernel family for every row
    with torch.device(dev):
        dense = LlamaDecoderLayer(lcfg, layer_idx=0).to(dtype)
        rotary = LlamaRotaryEmbedding(lcfg)
    dense.train()  # no dropout in Llama; bnb's CPU layers must stay in train mode (dry run)
    ref_layer = copy.deepcopy(dense).float()
    rows, notes = [], []
    models = {}
    # bitsandbytes copy: every nn.Linear replaced by bnb's Linear4bit over the same weight.
    if parts.bnb is not None:
        theirs = copy.deepcopy(dense)
        for name, mod in list(theirs.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(theirs.get_submodule(parent), child, _bnb_linear4bit(parts, mod, dtype, dev))
        models["peft"] = theirs
    ours = dense
    if lp.quantize_model is not None and lp.LoraLinear is not None:
        lp.quantize_model(ours)
        models["ours"] = ours
        # The reference computes with exactly the 4-bit weights, dequantized to float32.
        with torch.no_grad():
            for name in [n for n, m in ours.named_modules() if n.rsplit(".", 1)[-1] in targets]:
                ref_layer.get_submodule(name).weight.copy_(ours.get_submodule(name).dequantize(torch.float32))
        if "peft" in models:
            same = all(torch.equal(models["peft"].get_submodule(nm).weight.data.reshape(-1),
                                   ours.get_submodule(nm).weight.reshape(-1))
                       for nm, m in ours.named_modules() if nm.rsplit(".", 1)[-1] in targets)
            base["bnb_bytes_equal_ours"] = same
        lp.apply(ours, lp.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    else:
        # Without our modules the reference keeps bnb's dequantized weights (same bytes either way).
        if "peft" in models:
            with torch.no_grad():
                for name, m in models["peft"].named_modules():
                    if isinstance(m, parts.bnb.nn.Linear4bit):
                        w = parts.bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                        ref_layer.get_submodule(name).weight.copy_(w)
        notes.append("peft_kernels LoRA / quantize_model not importable")
    ref_pm, ref_inner = _peft_wrap(lp, ref_layer, targets, r, alpha, loaded_in_4bit=False)
    wrapped = {"ref": (ref_pm, ref_inner)}
    if "peft" in models:
        wrapped["peft"] = _peft_wrap(lp, models["peft"], targets, r, alpha, loaded_in_4bit=True)
        qtype = type(wrapped["peft"][1].self_attn.q_proj)
        base["peft_layer"] = f"{qtype.__module__}.{qtype.__name__}"
    if "ours" in models:
        wrapped["ours"] = (ours, ours)
    # One set of adapter values for all: A from our init (or PEFT's), B random and non-zero.
    names = [n for n, m in ref_inner.named_modules() if n.rsplit(".", 1)[-1] in targets]
    src = wrapped["ours" if "ours" in wrapped else "ref"][1]
    params = {key: [] for key in wrapped}
    with torch.no_grad():
        for nm in names:
            a = src.get_submodule(nm).lora_A["default"].weight.detach().float().clone()
            n_out = src.get_submodule(nm).lora_B["default"].weight.shape[0]
            bm = torch.randn(n_out, r, device=dev) / (2 * r ** 0.5)
            for key, (_, inner) in wrapped.items():
                layer = inner.get_submodule(nm)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(bm)
                params[key] += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    shape = (spec["batch"], spec["seq"], spec["hidden"])
    x = torch.randn(shape, device=dev, dtype=dtype)
    dy = torch.randn(shape, device=dev, dtype=dtype)
    pos = torch.arange(spec["seq"], device=dev)[None].expand(spec["batch"], -1)
    cos, sin = rotary(x.float(), pos)

    def make_step(key, run_dtype):
        model = wrapped[key][0]
        xin = x.to(run_dtype).requires_grad_(True)
        pe = (cos.to(run_dtype), sin.to(run_dtype))
        dyin = dy.to(run_dtype)

        def step():
            with torch.autocast(dev.type, dtype=dtype, enabled=key != "ref"):
                out = model(xin, position_ids=pos, position_embeddings=pe)
            out = out[0] if isinstance(out, tuple) else out
            return (out, *torch.autograd.grad(out, [xin] + params[key], dyin))
        return step

    ref_out = make_step("ref", torch.float32)()
    ref = {"y": ref_out[0].detach(), "dx": ref_out[1], "dA": torch.cat([g.reshape(-1) for g in ref_out[2::2]]),
           "dB": torch.cat([g.reshape(-1) for g in ref_out[3::2]])}
    del ref_out

    def check(o):
        # dA / dB: the 7 layers' gradients concatenated, one relative error each (per-layer ones of the
        # attention projections are tiny and noisy in 16-bit; the policy bound applies to the whole).
        got_a = torch.cat([g.reshape(-1).float() for g in o[2::2]])
        got_b = torch.cat([g.reshape(-1).float() for g in o[3::2]])
        return {"rel_err_y": rel_err(o[0], ref["y"]), "rel_err_dx": rel_err(o[1], ref["dx"]),
                "rel_err_dA": rel_err(got_a, ref["dA"]), "rel_err_dB": rel_err(got_b, ref["dB"])}

    tokens = spec["batch"] * spec["seq"]
    for impl in ("ours", "peft"):
        row_base = dict(base, impl=impl)
        if impl not in wrapped:
            rows.append(skip_row(row_base, notes[0] if impl == "ours" and notes else
                                 "bitsandbytes or peft not importable"))
            continue
        row = b.row(row_base, make_step(impl, dtype), check, tol=TOL[dtype])
        if row.get("status") == "ok":
            row["tokens_per_s"] = tokens / (row["ms"] / 1e3)
        rows.append(row)
    del wrapped, models, ref, x, dy, ref_layer, dense
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def decoder_summary(rows: list[dict]) -> dict:
    ms = {r["impl"]: r["ms"] for r in rows if r.get("status") == "ok"}
    out = {f"{i}_ms": v for i, v in ms.items()}
    if "ours" in ms and "peft" in ms:
        out["peft_over_ours"] = ms["peft"] / ms["ours"]
    return out


# ------------------------------------------------------------------ metadata
def metadata(args, device: torch.device, cfg: dict, b: Bench, parts: Parts) -> dict:
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "dry_run": args.dry_run,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "dtype": str(cfg["dtype"]).replace("torch.", ""),
        "blocksize": BLOCKSIZE,
        "quant": "nf4, double quant",
        "l2_flush_bytes": b.flush_bytes,
        "timing": "CUDA events, median of N reps after warm-up" if device.type == "cuda"
                  else "perf_counter, median (CPU dry run: not a measurement)",
        "backend_env": os.environ.get("PEFT_KERNELS_BACKEND", "auto"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception as e:
        meta["triton"] = f"unavailable ({type(e).__name__})"
    meta["bitsandbytes"] = parts.bnb.__version__ if parts.bnb is not None else None
    try:
        from peft_kernels.ops import backend
        meta["ours_backend"] = backend.select(device)
    except Exception as e:
        meta["ours_backend"] = f"? ({e})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(device=torch.cuda.get_device_name(device), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None))
        try:  # read-only query: clocks, power, temperature as found (never changed)
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.draw,power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
            meta["nvidia_smi"] = q.stdout.strip()
        except Exception:
            meta["nvidia_smi"] = None
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            meta["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return meta


# ------------------------------------------------------------------ rendering
def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def _cell(r, key, fmt, primary=True):
    """The value, or (in the primary column only) FAIL with its error / the row's status."""
    if r.get("status") == "ok":
        return _f(r.get(key), fmt)
    if not primary:
        return "—"
    if r.get("status") == "FAIL":
        errs = [v for kk, v in r.items() if kk.startswith("rel_err")]
        return f"FAIL (err {max(errs):.2g})" if errs else "FAIL"
    return r.get("status", "—")


def render(res: dict) -> str:
    m = res["meta"]
    lines = [f"## peft_kernels GPU suite — {m.get('device')} — {m['date_utc']}", "",
             f"torch {m['torch']} (CUDA {m.get('torch_cuda')}), triton {m.get('triton')}, "
             f"bitsandbytes {m.get('bitsandbytes') or 'absent'}, git {m.get('git', '?')}; "
             f"ours via `{m.get('ours_backend')}`; {m['timing']}; L2 flush "
             f"{'%d MiB' % (m['l2_flush_bytes'] >> 20) if m['l2_flush_bytes'] else 'off'}.", "",
             f"Command: `{m['command']}`", ""]
    c = res["ceilings"]
    copy, gemm = c.get("copy", {}), c.get("gemm", {})
    lines += [f"Ceilings: copy {_cell(copy, 'gbps', '.0f')} GB/s (read+write, {copy.get('what')}); "
              f"GEMM {_cell(gemm, 'tflops', '.1f')} TFLOP/s ({gemm.get('what')}).", ""]
    lines += [f"### (a) dequantize NF4 -> {m['dtype']} (blocksize {m['blocksize']}, double quant)", "",
              "| W [N,K] | impl | level | ms | GB/s | % copy | rel err | bit-exact |", "|---|---|---|---|---|---|---|---|"]
    for r in res["dequant"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['impl']} | {r['level']} | {_cell(r, 'ms', '.4f')} | "
                     f"{_cell(r, 'gbps', '.0f', False)} | {_cell(r, 'pct_copy', '.0f', False)} | "
                     f"{_f(r.get('rel_err'), '.1e')} | "
                     f"{r.get('bitexact_vs_reference', '—')} |" + (f" {r['note']}" if r.get("note") else ""))
    lines += ["", f"### (b) Linear fwd + bwd (dX only), {m['dtype']}: ms, ratios (ours/dense < 1: faster than "
              "dense; bnb/ours > 1: faster than bnb)", "",
              "| K->N | M | dense ms | ours ms | bnb ms | ours/dense | bnb/ours | ours TFLOP/s |",
              "|---|---|---|---|---|---|---|---|"]
    by = {(r["k"], r["n"], r["m"], r["impl"]): r for r in res["linear_fwd_bwd"]}
    for s in res["linear_summary"]:
        key = (s["k"], s["n"], s["m"])
        cell = {i: _cell(by.get(key + (i,), {"status": "—"}), "ms", ".3f") for i in ("dense", "ours", "bnb")}
        lines.append(f"| {s['k']}->{s['n']} | {s['m']} | {cell['dense']} | {cell['ours']} | {cell['bnb']} | "
                     f"{_f(s.get('ours_over_dense'), '.2f')} | {_f(s.get('bnb_over_ours'), '.2f')} | "
                     f"{_cell(by.get(key + ('ours',), {}), 'tflops', '.0f', False)} |")
    lines += ["", f"### (c) M=1 forward (no grad), {m['dtype']}: weight read rate", "",
              "| K->N | impl | level | us (device) | GB/s | % copy | back-to-back us/call |", "|---|---|---|---|---|---|---|"]
    for r in res["gemv_m1"]:
        us = {"status": r.get("status"), "v": r["ms"] * 1e3 if r.get("status") == "ok" else None,
              **{k: v for k, v in r.items() if k.startswith("rel_err")}}
        lines.append(f"| {r['k']}->{r['n']} | {r['impl']} | {r['level']} | {_cell(us, 'v', '.1f')} | "
                     f"{_cell(r, 'gbps', '.0f', False)} | {_cell(r, 'pct_copy', '.0f', False)} | "
                     f"{_cell(r, 'back_to_back_us', '.1f', False)} |" + (f" {r['note']}" if r.get("note") else ""))
    if res["crossover"]:
        lines += ["", f"### (d) Triton fused kernel vs dequant + cuBLAS (both forced), {m['dtype']}: ms", "",
                  "| K->N | M | kernel | fused (config) | dequant+cuBLAS | auto picks | faster |",
                  "|---|---|---|---|---|---|---|"]
        cross: dict = {}
        for r in res["crossover"]:
            if "kernel" in r:
                cross.setdefault((r["k"], r["n"], r["m"], r["kernel"]), {})[r["path"]] = r
            else:
                lines.append(f"| {r['k']}->{r['n']} | {r.get('m', '')} | | {r.get('status')} | | | | {r.get('note', '')}")
        for (k, n, mm_, kern), d in cross.items():
            fu, ws = d.get("fused", {}), d.get("workspace", {})
            faster = "—"
            if fu.get("status") == "ok" and ws.get("status") == "ok":
                faster = "fused" if fu["ms"] < ws["ms"] else "workspace"
            lines.append(f"| {k}->{n} | {mm_} | {kern} | {_cell(fu, 'ms', '.4f')} ({fu.get('config')}) | "
                         f"{_cell(ws, 'ms', '.4f')} | {fu.get('auto_path', '—')} | {faster} |")
    lines += render_lora(res)
    for name, rows in res.get("methods", {}).items():
        mod = _method_module(name)
        lines += ["", f"### ({_method_letter(name)}) {mod.TITLE}", ""] + mod.render(rows)
    if res["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    lines += ["", f"Suite time {res['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def render_lora(res: dict) -> list[str]:
    """Tables (e) and (f)."""
    m = res["meta"]
    lines = ["", f"### (e) LoRA linear fwd + bwd (dX, dA, dB), autocast {m['dtype']}: ms, ratios (ours/dense < 1: "
             "faster than the dense limit; peft/ours > 1: faster than PEFT + bitsandbytes)", "",
             "| K->N | r | M | dense ms | ours ms | peft ms | ours/dense | peft/ours | ours TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["k"], r["n"], r["r"], r["m"], r["impl"]): r for r in res["lora_fwd_bwd"]}
    for s in res["lora_summary"]:
        key = (s["k"], s["n"], s["r"], s["m"])
        cell = {i: _cell(by.get(key + (i,), {"status": "—"}), "ms", ".3f") for i in ("dense", "ours", "peft")}
        lines.append(f"| {s['k']}->{s['n']} | {s['r']} | {s['m']} | {cell['dense']} | {cell['ours']} | "
                     f"{cell['peft']} | {_f(s.get('ours_over_dense'), '.2f')} | {_f(s.get('peft_over_ours'), '.2f')} | "
                     f"{_cell(by.get(key + ('ours',), {}), 'tflops', '.0f', False)} |")
    lines += ["", f"### (f) Llama-3-8B-shaped decoder layer, QLoRA r=16 on all linear layers, fwd + bwd, autocast "
              f"{m['dtype']}", "",
              "| impl | ms | tokens/s | rel err y / dX / dA / dB | note |", "|---|---|---|---|---|"]
    for r in res["decoder_layer"]:
        errs = " / ".join(_f(r.get(f"rel_err_{k}"), ".1e") for k in ("y", "dx", "dA", "dB"))
        lines.append(f"| {r['impl']} | {_cell(r, 'ms', '.2f')} | {_cell(r, 'tokens_per_s', '.0f', False)} | {errs} | "
                     f"{r.get('note', r.get('peft_layer', '')) if r['impl'] == 'peft' else r.get('note', '')} |")
    if res["decoder_layer"]:
        r0 = res["decoder_layer"][0]
        lines.append("")
        lines.append(f"Shape: hidden {r0.get('hidden')}, intermediate {r0.get('intermediate')}, {r0.get('heads')} "
                     f"heads / {r0.get('kv_heads')} kv, seq {r0.get('seq')}, batch {r0.get('batch')}; peft/ours "
                     f"{_f(res['decoder_summary'].get('peft_over_ours'), '.2f')}; same 4-bit bytes: "
                     f"{r0.get('bnb_bytes_equal_ours', '—')}.")
    return lines


# ------------------------------------------------------------------ main
# ------------------------------------------------------------ method sections
def _method_module(name: str):
    import importlib
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(f"gpu_sections.{name}")


def _method_letter(name: str) -> str:
    return next(k for k, v in METHOD_SECTIONS.items() if v == name)


def method_section(b: "Bench", name: str, cfg: dict, dry: bool) -> list[dict]:
    """Rows of one method section; a section that fails to build becomes one error row."""
    try:
        return _method_module(name).run(b, cfg, dry)
    except Exception as e:
        return [{"impl": "setup", "status": "error", "note": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                 "traceback": traceback.format_exc(limit=6)}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (reference backend): a smoke test")
    p.add_argument("--interpret", action="store_true",
                   help="with --dry-run: also run the Triton rows under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="JSON file, or a directory to get gpu_suite.json")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip rows started after this many seconds")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between reps")
    p.add_argument("--sections", default=",".join(["a", "b", "c", "d", "e", "f", *METHOD_SECTIONS]),
                   help="comma list of a (dequant), b (fwd+bwd), c (M=1), d (fused/workspace crossover), "
                        "e (LoRA linear), f (decoder layer), "
                        + ", ".join(f"{k} ({v})" for k, v in METHOD_SECTIONS.items()))
    return p.parse_args(argv)


def out_path(arg: str | None) -> str:
    if arg is None:
        base = os.environ.get("OUT")
        return os.path.join(base, "gpu_suite.json") if base else "gpu_suite.json"
    if os.path.isdir(arg) or arg.endswith(os.sep) or not arg.endswith(".json"):
        os.makedirs(arg, exist_ok=True)
        return os.path.join(arg, "gpu_suite.json")
    os.makedirs(os.path.dirname(os.path.abspath(arg)), exist_ok=True)
    return arg


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
        if args.interpret:
            # Must be set before triton is first imported (bitsandbytes and our kernels import it).
            os.environ["TRITON_INTERPRET"] = "1"
            os.environ["PEFT_KERNELS_BACKEND"] = "triton"
        else:
            os.environ["PEFT_KERNELS_BACKEND"] = "reference"
        cfg = DRY
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for the CPU smoke test", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        cfg = FULL
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references must be true float32
    torch.manual_seed(0)
    sections = set(args.sections.split(","))
    parts = Parts(device, allow_triton=device.type == "cuda" or args.interpret)
    if args.dry_run:
        bench = Bench(device, flush=False, budget_s=args.budget_s, target_s=0.01, min_reps=2, max_reps=3)
    else:
        bench = Bench(device, flush=not args.no_flush, budget_s=args.budget_s, target_s=0.25, min_reps=10,
                      max_reps=200)
    res = {"meta": metadata(args, device, cfg, bench, parts), "notes": list(parts.notes)}
    out = out_path(args.out)

    def progress(msg):
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    def save():
        res["elapsed_s"] = time.monotonic() - t_start
        with open(out, "w") as f:
            json.dump(strict_json(res), f, indent=1)

    progress(f"device {res['meta']['device']}; writing {out}")
    res["ceilings"] = ceilings(bench, cfg)
    copy_gbps = res["ceilings"]["copy"].get("gbps")
    progress(f"ceilings: copy {_f(copy_gbps, '.1f')} GB/s, gemm {_f(res['ceilings']['gemm'].get('tflops'), '.2f')} "
             f"TFLOP/s")
    res["dequant"], res["gemv_m1"], res["linear_fwd_bwd"], res["crossover"] = [], [], [], []
    if "a" in sections:
        res["dequant"] = dequant_section(bench, parts, cfg)
        for r in res["dequant"]:
            if r.get("status") == "ok" and copy_gbps:
                r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
        progress("dequant done")
        save()
    if sections & {"b", "c", "d"}:
        for k, n in cfg["linear_shapes"]:
            if bench.out_of_time():
                res["notes"].append(f"{k}->{n} layers not built: time budget spent")
                continue
            try:
                layers, info = build_layers(parts, k, n, cfg["dtype"], device)
            except Exception as e:
                res["notes"].append(f"{k}->{n}: building layers failed: {type(e).__name__}: {e}")
                continue
            if "bnb_bytes_equal_ours" in info and not info["bnb_bytes_equal_ours"]:
                res["notes"].append(f"{k}->{n}: bnb quantized to different bytes than ours")
            if "c" in sections:
                res["gemv_m1"] += gemv_rows(bench, parts, layers, info, k, n, cfg["dtype"], copy_gbps)
            if "b" in sections:
                res["linear_fwd_bwd"] += linear_rows(bench, layers, k, n, cfg["ms"], cfg["dtype"])
            if "d" in sections:
                res["crossover"] += crossover_rows(bench, parts, info, k, n, cfg["crossover_ms"], cfg["dtype"])
            del layers, info
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress(f"linear {k}->{n} done")
            save()
    res["linear_summary"] = linear_summary(res["linear_fwd_bwd"])
    res["lora_fwd_bwd"], res["decoder_layer"] = [], []
    if sections & {"e", "f"}:
        lp = LoraParts()
        res["notes"] += lp.notes
        res["meta"].update(lp.versions)
        # (f) first: one short, headline comparison that a spent budget should not drop.
        for key, fn, label in (("f", decoder_section, "decoder layer"), ("e", lora_section, "LoRA linear")):
            if key not in sections:
                continue
            try:
                rows = fn(bench, parts, lp, cfg)
            except Exception as e:  # building the models failed: one error row, the table still prints
                rows = [{"impl": "setup", "k": 0, "n": 0, "r": 0, "m": 0, "status": "error",
                         "note": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                         "traceback": traceback.format_exc(limit=6)}]
            res["decoder_layer" if key == "f" else "lora_fwd_bwd"] = rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress(f"{label} done")
            save()
    res["lora_summary"] = lora_summary(res["lora_fwd_bwd"])
    res["decoder_summary"] = decoder_summary(res["decoder_layer"])
    res["methods"] = {}
    for key, name in METHOD_SECTIONS.items():
        if key in sections:
            res["methods"][name] = method_section(bench, name, cfg, args.dry_run)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            progress(f"{name} done")
            save()
    if bench.skipped_for_time:
        res["notes"].append(f"{bench.skipped_for_time} rows skipped: --budget-s {args.budget_s:g} spent")
    bad = [r for rows in [res[sec] for sec in ("dequant", "gemv_m1", "linear_fwd_bwd", "crossover", "lora_fwd_bwd",
                                               "decoder_layer")] + list(res["methods"].values())
           for r in rows
           if r.get("status") in ("FAIL", "error")]
    for r in bad:
        res["notes"].append(f"{r.get('status')}: {({k: v for k, v in r.items() if k != 'traceback'})}")
    res["ok"] = not bad and all(c.get("status") == "ok" for c in res["ceilings"].values())
    save()
    table = render(res)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
