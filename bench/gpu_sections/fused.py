"""gpu_suite section k: the fused RMSNorm, SwiGLU and RoPE kernels against the transformers code they replace.

At Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 query / 8 key-value heads of 128, 2048 tokens,
batch 1; dry run: the DRY decoder shapes on CPU in fp16), the suite dtype, every input requiring grad (the
RMSNorm weight too: the path where the norm trains):

* ``rmsnorm``: ``peft_kernels.nn.fused.FusedRMSNorm`` vs ``transformers`` ``LlamaRMSNorm`` (same weight);
* ``swiglu``: ``peft_kernels.ops.fused_layers.swiglu(gate, up)`` vs LlamaMLP's ``act_fn(gate) * up``;
* ``rope``: ``peft_kernels.ops.fused_layers.apply_rotary_pos_emb`` vs transformers' ``apply_rotary_pos_emb``
  on q [1, 32, 2048, 128] and k [1, 8, 2048, 128] as the attention makes them (transposed views);
* ``mlp``: a whole dense LlamaMLP vs ``FusedSwiGLUMLP`` over the same projections (context: how much of
  the MLP's time the fused activation saves; the three GEMMs dominate).

Rows per (kernel, impl): ``fwd`` (no graph) and ``fwd+bwd`` (forward, then the gradients of every input).
Each is checked first against a float32 reference from the same inputs, then timed. ``saved_bytes``: what
autograd keeps for backward (unique storages, parameters excluded); ``peak_mb``: the CUDA allocator's
peak during one call above what was allocated before it (CPU: not measured).
The issue's target: each fused kernel >= 1.5x faster than the code it replaces.
"""
from __future__ import annotations

import torch

TITLE = "fused RMSNorm / SwiGLU / RoPE vs the transformers modules they replace (fwd, fwd+bwd)"
IMPLS = ("fused", "hf")


def _saved_bytes(fn, params) -> int:
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _peak_bytes(dev: torch.device, fn):
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return peak


def _flat(ts):
    return torch.cat([t.detach().reshape(-1).float() for t in ts])


def _cases(dev, dtype, dry: bool, d: dict):
    """(name, inputs, params, {impl: fn(*inputs) -> tensor or tuple}, reference fn on float32 inputs, bytes)."""
    from transformers.activations import ACT2FN
    from transformers.models.llama import modeling_llama as L

    from peft_kernels.nn.fused import FusedRMSNorm, FusedSwiGLUMLP
    from peft_kernels.ops import fused_layers as FL
    from peft_kernels.ops import reference_fused as R

    t, h, inter = d["seq"] * d["batch"], d["hidden"], d["intermediate"]
    hd = h // d["heads"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    cases = []
    # RMSNorm, weight training.
    norm = L.LlamaRMSNorm(h, eps=1e-5).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(rnd(h) * 0.1 + 1.0)
    fused_norm = FusedRMSNorm.from_module(norm)
    x = rnd(t, h, scale=2.0)
    cases.append(("rmsnorm", [x, norm.weight], [norm.weight], {"fused": lambda a, w: fused_norm(a),
                                                                "hf": lambda a, w: norm(a)},
                  lambda a, w: R.rmsnorm_forward(a, w, 1e-5)[0], 2 * t * h * x.element_size()))
    # SwiGLU activation.
    gate, up = rnd(t, inter, scale=2.0), rnd(t, inter)
    act = ACT2FN["silu"]
    cases.append(("swiglu", [gate, up], [], {"fused": FL.swiglu, "hf": lambda a, b: act(a) * b},
                  R.swiglu_forward, 3 * t * inter * gate.element_size()))
    # RoPE on q and k as the attention makes them: [B, S, H, D] projections viewed as [B, H, S, D].
    q = rnd(d["batch"], d["seq"], d["heads"], hd).transpose(1, 2)
    k = rnd(d["batch"], d["seq"], d["kv_heads"], hd).transpose(1, 2)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.cat([torch.arange(d["seq"], dtype=torch.float32)[:, None] * inv] * 2, -1)[None]
    cos, sin = emb.cos().to(dev, dtype), emb.sin().to(dev, dtype)
    cases.append(("rope", [q, k], [], {"fused": lambda a, b: FL.apply_rotary_pos_emb(a, b, cos, sin),
                                       "hf": lambda a, b: L.apply_rotary_pos_emb(a, b, cos, sin)},
                  lambda a, b: (R.rope_forward(a, cos.float(), sin.float()), R.rope_forward(b, cos.float(), sin.float())),
                  2 * (q.numel() + k.numel()) * q.element_size()))
    # The whole MLP (dense, frozen projections: an adapter-less view of the GEMMs around the activation).
    cfg = L.LlamaConfig(hidden_size=h, intermediate_size=inter)
    mlp = L.LlamaMLP(cfg).to(dev, dtype)
    for p in mlp.parameters():
        p.requires_grad_(False)
    fused_mlp = FusedSwiGLUMLP.from_module(mlp)
    xm = rnd(t, h)
    w32 = [m.weight.float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]

    def mlp_ref(a):
        gg, uu = a @ w32[0].t(), a @ w32[1].t()
        return R.swiglu_forward(gg, uu) @ w32[2].t()

    cases.append(("mlp", [xm], [], {"fused": fused_mlp, "hf": mlp}, mlp_ref, None))
    return cases


def run(b, cfg: dict, dry: bool) -> list[dict]:
    from peft_kernels.ops import backend

    dev, dtype = b.device, cfg["dtype"]
    d = cfg["decoder"]
    rows = []
    for name, inputs, params, impls, reference, nbytes in _cases(dev, dtype, dry, d):
        if b.out_of_time():
            rows.append({"kernel": name, "impl": "all", "status": "skip", "note": "time budget spent"})
            continue
        # Leaves that need grad; detach() keeps each input's strides, so q/k stay transposed views.
        ins = [t if isinstance(t, torch.nn.Parameter) else t.detach().requires_grad_(True) for t in inputs]
        # float32 reference outputs and gradients from the same rounded inputs
        ref_ins = [t.detach().float().requires_grad_(True) for t in inputs]
        outs_ref = reference(*ref_ins)
        outs_ref = outs_ref if isinstance(outs_ref, tuple) else (outs_ref,)
        dys = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(dev, dtype) for o in outs_ref]
        grads_ref = torch.autograd.grad(outs_ref, ref_ins, [dy.float() for dy in dys])
        want_y, want_g = _flat(outs_ref), _flat(grads_ref)
        for impl, fn in impls.items():
            base = {"kernel": name, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
                    "tokens": d["seq"] * d["batch"],
                    "backend": backend.select(dev) if impl == "fused" else "torch"}

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(*ins)

            def fwd_bwd(fn=fn):
                y = fn(*ins)
                y = y if isinstance(y, tuple) else (y,)
                return (*y, *torch.autograd.grad(y, ins, dys))

            n_out = len(outs_ref)

            def check_fwd(o):
                o = o if isinstance(o, tuple) else (o,)
                return {"rel_err_y": b.rel_err(_flat(o), want_y)}

            def check_fwd_bwd(o):
                return {"rel_err_y": b.rel_err(_flat(o[:n_out]), want_y),
                        "rel_err_grads": b.rel_err(_flat(o[n_out:]), want_g)}

            saved = _saved_bytes(lambda fn=fn: fn(*ins), params)
            r = b.row(dict(base, step="fwd"), fwd, check_fwd, tol=b.tol[dtype], nbytes=nbytes)
            if r.get("status") == "ok":
                r["peak_mb"] = _mb(_peak_bytes(dev, fwd))
            rows.append(r)
            r = b.row(dict(base, step="fwd+bwd", saved_bytes=saved), fwd_bwd, check_fwd_bwd, tol=b.tol[dtype])
            if r.get("status") == "ok":
                r["peak_mb"] = _mb(_peak_bytes(dev, fwd_bwd))
            rows.append(r)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _mb(v):
    return None if v is None else v / 2 ** 20


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(rows: list[dict]) -> list[str]:
    lines = ["| kernel | step | impl | backend | status | ms | GB/s (min traffic) | hf/fused | peak MB | saved MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    times = {(r.get("kernel"), r.get("step"), r["impl"]): r.get("ms") for r in rows if r.get("status") == "ok"}
    for r in rows:
        ratio = None
        if r["impl"] == "fused":
            key = (r.get("kernel"), r.get("step"))
            t_h, t_f = times.get((*key, "hf")), times.get((*key, "fused"))
            ratio = t_h / t_f if t_h and t_f else None
        saved = r.get("saved_bytes")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        lines.append(f"| {r.get('kernel', '')} | {r.get('step', '')} | {r['impl']} | {r.get('backend', '')} | "
                     f"{status} | {_f(r.get('ms'), '.4f')} | {_f(r.get('gbps'), '.0f')} | {_f(ratio, '.2f')} | "
                     f"{_f(r.get('peak_mb'), '.1f')} | {_f(None if saved is None else saved / 2**20, '.2f')} |")
    lines.append("")
    lines.append("Target (issue #7): each fused kernel >= 1.5x faster than the transformers code it replaces "
                 "(rmsnorm, swiglu, rope rows; mlp is context).")
    return lines
