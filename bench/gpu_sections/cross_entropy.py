"""gpu_suite section j: fused linear cross-entropy against the full-logits loss, time and peak memory.

At the Llama-3-8B head shape (T = 2048 tokens, H = 4096, V = 128,256; dry run: T = 67, H = 64, V = 1000
on CPU with fp16), hidden states in the suite dtype, a frozen head (QLoRA: only dH flows back), 10% of the
labels ignored (-100). Loss + dH, one call each:

* ``full``: what a transformers model does: ``logits = h Wᵀ`` in the suite dtype, ``.float()``, then
  ``F.cross_entropy`` (the [T, V] logits in 16-bit AND float32, and their float32 gradient, are alive);
* ``fused``: ``peft_kernels.ops.fused_ce.fused_linear_cross_entropy`` over the same dense head;
* ``fused_4bit``: the same loss over a ``peft_kernels.nn.Linear4bit`` head (the 4-bit head of
  ``quantize_model(quantize_head=True)``) — checked against a float32 reference built from the same 4-bit
  bytes, so it is a different reference than the dense rows';
* ``full_4bit``: transformers' path over our 4-bit head (``head(h).float()`` then cross-entropy) — the
  baseline of ``fused_4bit``.

Each row is checked first (loss and dH against float32 autograd through the full logits, TF32 off), then
timed. ``peak_mib``: CUDA memory allocated at the peak of one call above what was resident before it
(``torch.cuda.max_memory_allocated`` delta; CUDA only). The issue's target: fused peak <= 1/8 of the
full-logits loss's peak (``peak full / fused`` column >= 8).
"""
from __future__ import annotations

import torch

TITLE = "Fused linear cross-entropy vs the full-logits loss (loss + dH, frozen head): time and peak memory"
IMPLS = ("full", "fused", "full_4bit", "fused_4bit")


def _shape(dry: bool) -> tuple[int, int, int]:
    return (67, 64, 1000) if dry else (2048, 4096, 128256)


def peak_mib(dev: torch.device, fn) -> float | None:
    """MiB allocated at the peak of one ``fn()`` call above what was allocated before it (CUDA only)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return peak / 2 ** 20


def _reference(hidden: torch.Tensor, w32: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dH) in float32 from the full logits (TF32 off)."""
    from peft_kernels.ops.reference_ce import linear_cross_entropy_reference
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h = hidden.detach().float().requires_grad_(True)
        loss, _ = linear_cross_entropy_reference(h, w32, labels)
        (dh,) = torch.autograd.grad(loss, (h,))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return loss.detach(), dh


def run(b, cfg: dict, dry: bool) -> list[dict]:
    import torch.nn.functional as F

    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.ops import reference
    from peft_kernels.ops.fused_ce import fused_linear_cross_entropy

    dev, dtype = b.device, cfg["dtype"]
    t, h, v = _shape(dry)
    g = torch.Generator(device="cpu").manual_seed(0)
    dense = torch.nn.Linear(h, v, bias=False).to(dev, dtype)
    dense.weight.requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_((torch.randn(v, h, generator=g) / h ** 0.5).to(dev, dtype))
    head4 = Linear4bit.from_linear(dense)
    qs = head4.quant_state
    w4_32 = reference.dequantize_4bit(head4.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                      torch.float32).view(v, h)
    hidden = (torch.randn(t, h, generator=g) * 2.0).to(dev, dtype).requires_grad_(True)
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) < 0.1] = -100
    labels = labels.to(dev)
    refs = {"dense": _reference(hidden, dense.weight.float(), labels), "4bit": _reference(hidden, w4_32, labels)}

    def full(head):
        def step():
            logits = head(hidden).float()  # as transformers' ForCausalLMLoss upcasts
            loss = F.cross_entropy(logits, labels, ignore_index=-100)
            return (loss, *torch.autograd.grad(loss, (hidden,)))
        return step

    def fused(head):
        def step():
            loss = fused_linear_cross_entropy(hidden, head, labels)
            return (loss, *torch.autograd.grad(loss, (hidden,)))
        return step

    plan = {"full": (full(dense), "dense"), "fused": (fused(dense), "dense"),
            "full_4bit": (full(head4), "4bit"), "fused_4bit": (fused(head4), "4bit")}
    rows = []
    for impl in IMPLS:
        fn, which = plan[impl]
        ref_loss, ref_dh = refs[which]
        row = {"impl": impl, "t": t, "h": h, "v": v, "dtype": str(dtype).replace("torch.", ""),
               "full_logits_fp32_mib": t * v * 4 / 2 ** 20}

        def check(o, ref_loss=ref_loss, ref_dh=ref_dh):
            return {"rel_err_loss": b.rel_err(o[0].reshape(1), ref_loss.reshape(1)),
                    "rel_err_dh": b.rel_err(o[1], ref_dh)}
        out = b.row(row, fn, check, tol=b.tol[dtype], flops=4.0 * t * h * v)
        if out.get("status") == "ok":
            out["peak_mib"] = peak_mib(dev, fn)
        rows.append(out)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(rows: list[dict]) -> list[str]:
    by = {r["impl"]: r for r in rows if "impl" in r}
    lines = ["| head | T x H -> V | full ms | fused ms | full/fused time | full peak MiB | fused peak MiB | "
             "peak full/fused |", "|---|---|---|---|---|---|---|---|"]
    for head, (fu_name, fz_name) in (("dense", ("full", "fused")), ("4-bit", ("full_4bit", "fused_4bit"))):
        fu, fz = by.get(fu_name), by.get(fz_name)
        if fu is None or fz is None:
            continue

        def ms(r):
            return _f(r.get("ms"), ".3f") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('note', '')}"
        ok = fu.get("status") == "ok" and fz.get("status") == "ok"
        pk_fu, pk_fz = fu.get("peak_mib"), fz.get("peak_mib")
        lines.append(f"| {head} | {fu['t']} x {fu['h']} -> {fu['v']} | {ms(fu)} | {ms(fz)} | "
                     f"{_f(fu['ms'] / fz['ms'] if ok else None, '.2f')} | {_f(pk_fu, '.0f')} | {_f(pk_fz, '.0f')} | "
                     f"{_f(pk_fu / pk_fz if ok and pk_fu and pk_fz else None, '.1f')} |")
    lines += ["", "Target (issue #7): fused peak <= 1/8 of the full-logits loss's (peak full/fused >= 8)."]
    return lines
