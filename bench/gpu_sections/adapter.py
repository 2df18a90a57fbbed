"""gpu_suite section i: the fused bottleneck adapter vs the unfused torch module.

One adapter ``h + s·up(act(down(h)))`` at d = 4096, r = 64, M in {512, 8192} (dry run: d = 128, r = 16,
M in {16, 48} on CPU), the suite dtype for h and float32 parameters (``nn.Adapter``'s default) for both:

* ``fused``: ``peft_kernels.nn.Adapter`` (the custom op: Triton down / up kernels forward, dz / dh kernels
  + two cuBLAS weight-gradient GEMMs backward; saves h and the [M, r] pre-activation only);
* ``unfused``: the same parameters through plain torch (``F.linear`` / activation / scale / residual,
  ``ops.reference_adapter.adapter_autograd``): what an adapter written as an nn.Module costs.

Rows per (M, impl): ``fwd`` (forward only, no graph) and ``fwd+bwd`` (forward, then the gradients of h
and all four parameters). Each is first checked against a float32 reference built from the same
inputs (y and all five gradients), then timed. ``saved_bytes``: what autograd keeps for backward (unique
storages, parameters excluded; measured once per row with ``saved_tensors_hooks``).
The issue's target: fused fwd+bwd >= 1.5x faster than unfused at these shapes, with fewer saved bytes.
"""
from __future__ import annotations

import math

import torch

TITLE = "bottleneck adapter: fused op vs unfused torch module (fwd, fwd+bwd)"
ACT = "gelu"
SCALE = 0.5
NAMES = ("y", "dh", "dwd", "dbd", "dwu", "dbu")


def _shapes(dry: bool) -> tuple[int, int, list[int]]:
    return (128, 16, [16, 48]) if dry else (4096, 64, [512, 8192])


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


def run(b, cfg: dict, dry: bool) -> list[dict]:
    from peft_kernels.nn.adapter import Adapter
    from peft_kernels.ops import backend
    from peft_kernels.ops import reference_adapter as R

    dev, dtype = b.device, cfg["dtype"]
    d, r, ms = _shapes(dry)
    torch.manual_seed(0)
    mod = Adapter(d, r, activation=ACT, scaling=SCALE, init="random", device=dev)
    with torch.no_grad():  # an up branch as large as h, so the check sees the adapter, not just h
        mod.up.weight.mul_(math.sqrt(r))
    params = [mod.down.weight, mod.down.bias, mod.up.weight, mod.up.bias]

    def unfused(h):
        return R.adapter_autograd(h, *params, mod.scaling, ACT)

    impls = {"fused": mod, "unfused": unfused}
    rows = []
    for m in ms:
        if b.out_of_time():
            rows.append({"impl": "all", "m": m, "d": d, "r": r, "status": "skip", "note": "time budget spent"})
            continue
        g = torch.Generator(device="cpu").manual_seed(m)
        h = torch.randn(m, d, generator=g).to(dev, dtype).requires_grad_(True)
        dy = torch.randn(m, d, generator=g).to(dev, dtype)
        # float32 reference from the same (rounded) inputs, TF32 off (the suite turns it off).
        h32 = h.detach().float().requires_grad_(True)
        # Parameters as both implementations compute with them: rounded to the activations' dtype.
        p32 = [p.detach().to(dtype).float().requires_grad_(True) for p in params]
        y32 = R.adapter_autograd(h32, *p32, mod.scaling, ACT)
        want = (y32.detach(), *torch.autograd.grad(y32, [h32, *p32], dy.float()))
        for name, fn in impls.items():
            base = {"impl": name, "m": m, "d": d, "r": r, "dtype": str(dtype).replace("torch.", ""),
                    "backend": backend.select(dev) if name == "fused" else "torch"}

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(h)

            def fwd_bwd(fn=fn):
                # All five gradients, as a training step needs them (autograd would skip unrequested ones).
                y = fn(h)
                return (y, *torch.autograd.grad(y, [h, *params], dy))

            def check_fwd(y):
                return {"rel_err_y": b.rel_err(y, want[0])}

            def check_fwd_bwd(o):
                return {f"rel_err_{n}": b.rel_err(got, ref) for n, got, ref in zip(NAMES, o, want)}

            saved = _saved_bytes(lambda fn=fn: fn(h), params + [mod.scaling])
            # Traffic floor of the fused forward (h read twice, out written) and fwd+bwd (+ dy read three
            # times, h once more, dh written): what a perfectly bandwidth-bound implementation moves.
            es = h.element_size()
            rows.append(b.row(dict(base, step="fwd"), fwd, check_fwd, tol=b.tol[dtype], nbytes=3 * m * d * es,
                              poison_specs=[((m, d), dtype)]))
            rows.append(b.row(dict(base, step="fwd+bwd", saved_bytes=saved), fwd_bwd, check_fwd_bwd,
                              tol=b.tol[dtype], nbytes=8 * m * d * es, poison_specs=[((m, d), dtype)] * 2))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(rows: list[dict]) -> list[str]:
    lines = ["| M | d | r | step | impl | backend | status | ms | GB/s (floor traffic) | unfused/fused | saved MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    times = {(r.get("m"), r.get("step"), r["impl"]): r.get("ms") for r in rows if r.get("status") == "ok"}
    for r in rows:
        ratio = None
        if r["impl"] == "fused":
            key = (r.get("m"), r.get("step"))
            t_u, t_f = times.get((*key, "unfused")), times.get((*key, "fused"))
            ratio = t_u / t_f if t_u and t_f else None
        saved = r.get("saved_bytes")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('note', '')}"
        lines.append(f"| {r.get('m', '')} | {r.get('d', '')} | {r.get('r', '')} | {r.get('step', '')} | {r['impl']} | "
                     f"{r.get('backend', '')} | {status} | {_f(r.get('ms'), '.4f')} | {_f(r.get('gbps'), '.0f')} | "
                     f"{_f(ratio, '.2f')} | {_f(None if saved is None else saved / 2**20, '.2f')} |")
    lines.append("")
    lines.append("Target (issue #4): fused fwd+bwd >= 1.5x faster than unfused at d=4096, r=64, "
                 "with fewer saved bytes.")
    return lines
