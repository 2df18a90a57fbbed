"""gpu_suite section g: one BitFit linear layer, forward + backward (dX, db), against its baselines.

At K -> N = 4096 -> 14336 (the Llama-3-8B MLP up/gate shape), M in {1, 512, 8192} (dry run: 128 -> 448,
M in {1, 48, 80} on CPU with fp16), the suite dtype for x, float32 trainable biases:

* ``ours``: ``peft_kernels.nn.bitfit.BitFitLinear`` over ``peft_kernels.nn.Linear4bit`` (saves nothing of x;
  dX and db in one pass over dY by ``kernels/bitfit.py`` up to ``FUSED_MAX_M``, workspace + cuBLAS and one
  column reduction above);
* ``bnb``: ``bitsandbytes.nn.Linear4bit`` over the same 4-bit bytes with a trainable float32 bias (BitFit
  done with bitsandbytes' own layer);
* ``lora_r16``: our ``peft_kernels.nn.LoraLinear`` r = 16 (alpha 32, float32 adapters, random B) over the
  same ``Linear4bit``: the method BitFit is compared with. Its gradients are dX, dA, dB.

Every row runs under ``torch.autocast`` to the suite dtype (as section e), is checked first against a
float32 reference from the same 4-bit bytes (y, dX, db; LoRA: y, dX, dA, dB), then timed. ``saved_x_bytes``
(ours): bytes of x's storage autograd keeps — 0 by design.

A second table, ``kernel``: the backward alone at M in {16, 64} (dry: {16}), the fused dX + db kernel
(forced config) vs matmul4bit's dX kernel followed by a separate ``dy.sum(0)`` — what fusing the
reduction into the dX pass buys where the fused kernel runs.

The issue's target: at 4096 -> 14336, M = 8192, ours fwd+bwd <= 0.75x the LoRA r = 16 layer's time.
"""
from __future__ import annotations

import torch

TITLE = "BitFit linear fwd + bwd (dX, db): ours vs bitsandbytes Linear4bit + trainable bias vs our LoRA r=16"
IMPLS = ("ours", "bnb", "lora_r16")


def _shape(cfg: dict, dry: bool) -> tuple[int, int, list[int], list[int]]:
    k, n = max(cfg["linear_shapes"], key=lambda s: s[0] * s[1])  # the 4096 -> 14336 shape
    return (k, n, [1, 48, 80], [16]) if dry else (k, n, [1, 512, 8192], [16, 64])


def _bnb_layer(dense: torch.nn.Linear, dtype, dev):
    """bitsandbytes' Linear4bit over ``dense``'s weight (load, then .to() quantizes), or (None, why)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - any import failure only skips the column
        return None, f"bitsandbytes not importable ({type(e).__name__}: {e})"
    bl = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype,
                           compress_statistics=True, quant_type="nf4", device=dev)
    bl.load_state_dict(dense.state_dict())
    bl = bl.to(dev)
    bl.train()  # CPU (dry run): an eval-mode forward would repack the weight
    return bl, None


def _saved_x_bytes(fn, x: torch.Tensor) -> int:
    ptr = x.untyped_storage().data_ptr()
    found = []

    def pack(t):
        if t.untyped_storage().data_ptr() == ptr:
            found.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(found)


def run(b, cfg: dict, dry: bool) -> list[dict]:
    from peft_kernels.nn.bitfit import BitFitLinear
    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.nn.lora import LoraLinear
    from peft_kernels.ops import backend, reference

    dev, dtype = b.device, cfg["dtype"]
    k, n, ms, kernel_ms = _shape(cfg, dry)
    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
    dense.weight.requires_grad_(False)
    base = Linear4bit.from_linear(dense)
    qs = base.quant_state
    w_q = reference.dequantize_4bit(base.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                    torch.float32).view(n, k)
    bias0 = torch.randn(n, device=dev) * 0.1

    ours = BitFitLinear(base).train()
    with torch.no_grad():
        ours.bias.copy_(bias0)
    impls: dict = {"ours": (ours, [ours.bias])}
    missing: dict = {}
    bl, why = _bnb_layer(dense, dtype, dev)
    if bl is not None and not torch.equal(bl.weight.data.reshape(-1), base.weight.reshape(-1)):
        bl, why = None, "bitsandbytes quantized to different bytes than ours"  # w_q would be the wrong reference
    if bl is None:
        missing["bnb"] = why
    else:
        bl.bias = torch.nn.Parameter(bias0.clone())
        bl.weight.requires_grad_(False)
        impls["bnb"] = (bl, [bl.bias])
    r, alpha = 16, 32
    lora = LoraLinear(base, "default", r=r, lora_alpha=alpha).train()
    g = torch.Generator(device="cpu").manual_seed(1)
    a = ((torch.rand(r, k, generator=g) * 2 - 1) / k ** 0.5).to(dev)
    bm = (torch.randn(n, r, generator=g) / (2 * r ** 0.5)).to(dev)  # non-zero: the LoRA branch is checked
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(a)
        lora.lora_B["default"].weight.copy_(bm)
    impls["lora_r16"] = (lora, [lora.lora_A["default"].weight, lora.lora_B["default"].weight])
    s = alpha / r

    shared = dict(k=k, n=n, r=r, s=s, a=a, bm=bm, w_q=w_q, bias0=bias0, impls=impls, missing=missing, ours=ours)
    rows: list[dict] = []
    for m in ms:
        rows += _layer_rows(b, m, dtype, shared)  # one call per M: its tensors are freed on return
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if backend.select(dev) != "triton":
        rows.append({"impl": "kernel", "k": k, "n": n, "status": "skip",
                     "note": "Triton unavailable here (dry run without --interpret)"})
    else:
        for m in kernel_ms:
            rows += _kernel_rows(b, base, w_q, k, n, m, dtype)
    return rows


def _layer_rows(b, m: int, dtype, c: dict) -> list[dict]:
    """Rows of the three implementations at one M, each checked against float32 references."""
    from peft_kernels.ops import backend
    dev, k, n, s, a, bm, w_q = b.device, c["k"], c["n"], c["s"], c["a"], c["bm"], c["w_q"]
    gm = torch.Generator(device="cpu").manual_seed(100 + m)
    x = torch.randn(m, k, generator=gm).to(dev, dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=gm).to(dev, dtype)
    xf, dyf = x.detach().float(), dy.float()
    y_base, dx_base = xf @ w_q.t(), dyf @ w_q
    xa, dyb = xf @ a.t(), dyf @ bm
    refs = {"bitfit": {"y": y_base + c["bias0"], "dx": dx_base, "db": dyf.sum(0)},
            "lora": {"y": y_base + s * xa @ bm.t(), "dx": dx_base + s * dyb @ a, "dA": s * dyb.t() @ xf,
                     "dB": s * dyf.t() @ xa}}
    rows = []
    for impl in IMPLS:
        row = {"k": k, "n": n, "m": m, "impl": impl, "dtype": str(dtype).replace("torch.", "")}
        if impl in c["missing"]:
            rows.append(dict(row, status="skip", note=c["missing"][impl]))
            continue
        mod, params = c["impls"][impl]
        ref = refs["lora" if impl == "lora_r16" else "bitfit"]
        names = ("y", "dx", "dA", "dB") if impl == "lora_r16" else ("y", "dx", "db")
        if impl == "ours":
            row["backend"] = backend.select(dev, has_cpu_impl=True)
            row["saved_x_bytes"] = _saved_x_bytes(lambda: c["ours"](x), x)

        def step(mod=mod, params=params):
            with torch.autocast(dev.type, dtype=dtype):
                y = mod(x)
            return (y, *torch.autograd.grad(y, (x, *params), dy))  # no accumulation into .grad

        def check(o, ref=ref, names=names):
            return {f"rel_err_{key}": b.rel_err(t, ref[key]) for key, t in zip(names, o)}
        flops = 4.0 * m * n * k + (6.0 * m * c["r"] * (n + k) if impl == "lora_r16" else 0.0)
        rows.append(b.row(row, step, check, tol=b.tol[dtype], flops=flops,
                          poison_specs=[((m, n), dtype), ((m, k), dtype)]))
    return rows


def _kernel_rows(b, base, w_q, k: int, n: int, m: int, dtype) -> list[dict]:
    """Backward alone where the fused kernel runs: fused dX + db vs the dX kernel then a separate db sum."""
    from peft_kernels.kernels import bitfit as kb
    from peft_kernels.kernels import matmul4bit
    qs = base.quant_state
    absmax = qs.absmax_float().contiguous()
    dy = torch.randn(m, n, device=b.device, dtype=dtype)
    ref_dx, ref_db = dy.float() @ w_q, dy.float().sum(0)
    cfg_name = kb.pick_config(m)

    def fused():
        return kb.bitfit_grad_4bit(dy, base.weight, absmax, qs.code, qs.blocksize, k, config=cfg_name)

    def separate():
        dx = matmul4bit.matmul_4bit_nn(dy, base.weight, absmax, qs.code, qs.blocksize, k,
                                       config=cfg_name[len("bitfit_"):])
        return dx, dy.sum(0, dtype=torch.float32)

    rows = []
    for path, fn in (("fused dX+db", fused), ("dX kernel + sum", separate)):
        row = {"impl": "kernel", "path": path, "config": cfg_name, "k": k, "n": n, "m": m,
               "dtype": str(dtype).replace("torch.", "")}
        rows.append(b.row(row, fn, lambda o: {"rel_err_dx": b.rel_err(o[0], ref_dx),
                                              "rel_err_db": b.rel_err(o[1], ref_db)},
                          tol=b.tol[dtype], flops=2.0 * m * n * k, poison_specs=[((m, k), dtype)]))
    return rows


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def _ms(r: dict | None) -> str:
    if r is None:
        return "—"
    if r.get("status") == "ok":
        return _f(r.get("ms"), ".3f")
    errs = [v for key, v in r.items() if key.startswith("rel_err") and isinstance(v, float)]
    if r.get("status") == "FAIL" and errs:
        return f"FAIL (err {max(errs):.2g})"
    return f"{r.get('status')}: {r.get('note', '')}"


def render(rows: list[dict]) -> list[str]:
    lines = ["| K->N | M | ours ms | bnb+bias ms | LoRA r16 ms | ours/LoRA | bnb/ours | ours TFLOP/s | "
             "saved x bytes (ours) | backend |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    layer = [r for r in rows if r.get("impl") in IMPLS]
    by = {(r["k"], r["n"], r["m"], r["impl"]): r for r in layer if "m" in r}
    for key in dict.fromkeys((r["k"], r["n"], r["m"]) for r in layer if "m" in r):
        o, bb, lo = (by.get(key + (i,)) for i in IMPLS)
        t = {i: (r["ms"] if r and r.get("status") == "ok" else None) for i, r in zip(IMPLS, (o, bb, lo))}
        ratio = t["ours"] / t["lora_r16"] if t["ours"] and t["lora_r16"] else None
        vs_bnb = t["bnb"] / t["ours"] if t["bnb"] and t["ours"] else None
        lines.append(f"| {key[0]}->{key[1]} | {key[2]} | {_ms(o)} | {_ms(bb)} | {_ms(lo)} | {_f(ratio, '.2f')} | "
                     f"{_f(vs_bnb, '.2f')} | {_f((o or {}).get('tflops') if t['ours'] else None, '.0f')} | "
                     f"{(o or {}).get('saved_x_bytes', '—')} | {(o or {}).get('backend', '—')} |")
    for r in rows:
        if r.get("impl") not in IMPLS + ("kernel",):
            lines.append(f"- {r.get('impl')}: {r.get('status')} ({r.get('note', '')})")
    kern = [r for r in rows if r.get("impl") == "kernel"]
    if kern:
        lines += ["", "Backward alone where the fused kernel runs (ms): fused dX + db vs dX kernel + separate sum.",
                  "", "| K->N | M | config | fused dX+db | dX kernel + sum | sum-separate / fused |",
                  "|---|---|---|---|---|---|"]
        kb: dict = {}
        for r in kern:
            if "path" not in r:
                lines.append(f"- kernel rows: {r.get('status')} ({r.get('note', '')})")
                continue
            kb.setdefault((r["k"], r["n"], r["m"], r["config"]), {})[r["path"]] = r
        for (k, n, m, c), d in kb.items():
            fu, se = d.get("fused dX+db"), d.get("dX kernel + sum")
            ok = fu and se and fu.get("status") == "ok" and se.get("status") == "ok"
            lines.append(f"| {k}->{n} | {m} | {c} | {_ms(fu)} | {_ms(se)} | "
                         f"{_f(se['ms'] / fu['ms'] if ok else None, '.2f')} |")
    lines += ["", "Target (issue #8): at 4096->14336, M = 8192, ours fwd+bwd <= 0.75x the LoRA r=16 layer "
              "(ours/LoRA column).", "Both run the same two GEMMs (forward, dX); see ARCHITECTURE for the floor."]
    return lines
