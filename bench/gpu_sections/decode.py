"""gpu_suite section m: the decode GEMV (M <= 16) over a 4-bit NF4 weight, and the dispatch table it fills.

Shapes K -> N = 4096 -> 14336 and 4096 -> 4096 (dry run: 128 -> 448, 128 -> 128), M in {1, 4, 16}, the
suite dtype for x (bf16; dry: fp16), blocksize 64 with double-quantized absmax (bitsandbytes' QLoRA
default):

* ``cuda_c``: ``pk_gemv_4bit`` (csrc/gemv_4bit.cu) through ``cuda_lib.gemv_4bit_cuda``; it decodes the
  nested absmax itself, so its bytes are packed + uint8 absmax + nested stats;
* ``triton_gemv`` (M = 1) / ``triton_tiled``: Triton's dot-free GEMV and 16-row tile, forced by config,
  over the float32 absmax decoded beforehand (the decode of the scales is not timed: kernel level);
* ``cublas_bf16``: ``torch.matmul`` against the dense weight in the suite dtype (cuBLAS GEMV/GEMM);
* ``bnb``: ``bitsandbytes.functional.gemv_4bit`` over bitsandbytes' own 4-bit bytes (M = 1: its
  inference kernel takes one row);
* ``copy``: ``torch`` clone of a uint8 tensor as large as the 4-bit weight, timed the same way: the copy
  bandwidth (read + write bytes) each GEMV's weight-read rate is a percentage of.

With LoRA (r = 16, ``+lora`` rows): ``cuda_c`` vs Triton's LoRA GEMV / tile, y += s * xa B^T.

Every row is checked against a float32 reference first (y; ``b.row``), then timed with L2 flushed
between reps (the 29 MB weight of 4096 -> 14336 would otherwise be served by the 50 MB L2).
``gbps`` is bytes of the weight (+ x and y) per second; ``pct_copy`` its share of the copy row's GB/s.

Dispatch: for every (M, N, K, LoRA) the faster of ``cuda_c`` and the Triton kernel becomes an entry of
the decode dispatch table (``peft_kernels/ops/decode_dispatch.py``), written (on a GPU, not in the dry
run) to ``$PEFT_KERNELS_DECODE_TABLE_OUT``, else ``$OUT/decode_dispatch.json``, else
``./decode_dispatch.json``, merged with the shipped table's entries for other GPUs. Copy it to
``peft_kernels/assets/decode_dispatch.json`` to ship it.

Targets (issue #6): at M = 1, 4096 -> 14336: cuda_c >= 75 % of copy bandwidth on the 4-bit weight and
>= 2.5x faster than cublas_bf16.
"""
from __future__ import annotations

import json
import os

import torch

TITLE = "Decode GEMV (M <= 16) over NF4: CUDA C vs Triton vs bf16 cuBLAS vs bitsandbytes gemv_4bit"
BLOCKSIZE = 64
RANK = 16
MS = (1, 4, 16)


def _shapes(cfg: dict, dry: bool):
    # (K in, N out): the suite's linear shapes, largest first (the headline shape survives a spent budget).
    return sorted(cfg["linear_shapes"], key=lambda s: -s[0] * s[1])


def _weight(k, n, dtype, dev):
    from peft_kernels.ops import reference
    from peft_kernels.quant import quantize_4bit

    g = torch.Generator().manual_seed(k + n)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dev, dtype)
    packed, st = quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", double_quant=True)
    w_q = reference.dequantize_4bit(packed, st.absmax_float(), st.code, BLOCKSIZE, n * k, torch.float32).view(n, k)
    return w, packed, st, w_q


def _bytes_4bit(packed, st) -> int:
    return packed.numel() + st.storage_bytes()


def _bnb(w, dev):
    """(packed, QuantState, float32 dequantized W) in bitsandbytes' own format, or (None, why)."""
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure only skips the column
        return None, f"bitsandbytes not importable ({type(e).__name__}: {e})"
    try:
        bp, bqs = F.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        wq = F.dequantize_4bit(bp, bqs, quant_type="nf4").float()
    except Exception as e:  # noqa: BLE001
        return None, f"bitsandbytes cannot quantize on {dev} ({type(e).__name__}: {e})"
    return (F, bp, bqs, wq), None


def _cuda_lib_reason(dev) -> str | None:
    if dev.type != "cuda":
        return "CUDA C GEMV needs a CUDA device"
    from peft_kernels.ops import cuda_lib
    return None if cuda_lib.load() is not None else f"CUDA C library unavailable: {cuda_lib.unavailable_reason()}"


def run(b, cfg: dict, dry: bool) -> list[dict]:
    from peft_kernels.ops import backend, cuda_lib

    dev, dtype = b.device, cfg["dtype"]
    dname = str(dtype).replace("torch.", "")
    esz = torch.tensor([], dtype=dtype).element_size()
    triton_ok = backend.triton_usable(dev)
    cuda_reason = _cuda_lib_reason(dev)
    rows: list[dict] = []
    for k, n in _shapes(cfg, dry):
        w, packed, st, w_q = _weight(k, n, dtype, dev)
        absmax_f = st.absmax_float()
        nested = dict(nested_absmax=st.nested.absmax, nested_code=st.nested.code, nested_offset=st.nested.offset)
        wbytes = _bytes_4bit(packed, st)
        shape = {"k": k, "n": n, "dtype": dname, "weight_bytes": wbytes}
        # The copy baseline: as many bytes as the 4-bit weight, read + written.
        src = torch.randint(0, 256, (wbytes,), dtype=torch.uint8, device=dev)
        rows.append(b.row(dict(shape, impl="copy", m=0), lambda: src.clone(),
                          lambda o: {"rel_err_copy": 0.0 if torch.equal(o, src) else float("inf")}, tol=0.0,
                          nbytes=2 * wbytes))
        copy_gbps = rows[-1].get("gbps")
        del src
        if dev.type == "cuda":
            bnb, bnb_reason = _bnb(w, dev)
        else:  # its CPU gemv_4bit expects the layout bnb's Linear4bit repacks to in eval mode, not these bytes
            bnb, bnb_reason = None, "bitsandbytes gemv_4bit rows run on CUDA only"
        g = torch.Generator().manual_seed(n)
        lora_B = (torch.randn(n, RANK, generator=g) * 0.05).to(dev, dtype)
        for m in MS:
            x = torch.randn(m, k, generator=g).to(dev, dtype)
            xa = torch.randn(m, RANK, generator=g).to(dev, dtype)
            ref = x.float() @ w_q.t()
            ref_lora = ref + 0.5 * xa.float() @ lora_B.float().t()
            io = (m * k + m * n) * esz
            base = dict(shape, m=m)
            cands = []  # (impl, lora, fn, reference, bytes)
            if cuda_reason is None:
                cands.append(("cuda_c", False, lambda x=x: cuda_lib.gemv_4bit_cuda(x, packed, st.absmax, st.code,
                                                                                  BLOCKSIZE, n, **nested), ref,
                              wbytes))
                cands.append(("cuda_c", True, lambda x=x, xa=xa: cuda_lib.gemv_4bit_cuda(
                    x, packed, st.absmax, st.code, BLOCKSIZE, n, **nested, xa=xa, lora_B=lora_B, scale=0.5),
                    ref_lora, wbytes))
            else:
                rows.append(dict(base, impl="cuda_c", status="skip", note=cuda_reason))
            if triton_ok:
                from peft_kernels.kernels.lora import lora_matmul_4bit_nt
                from peft_kernels.kernels.matmul4bit import matmul_4bit_nt
                abytes = packed.numel() + absmax_f.numel() * 4 + 64
                for cfg_name in (("nt_gemv", "nt_m16") if m == 1 else ("nt_m16",)):
                    impl = "triton_gemv" if cfg_name == "nt_gemv" else "triton_tiled"
                    cands.append((impl, False, lambda x=x, c=cfg_name: matmul_4bit_nt(
                        x, packed, absmax_f, st.code, BLOCKSIZE, n, config=c), ref, abytes))
                    cands.append((impl, True, lambda x=x, xa=xa, c=cfg_name: lora_matmul_4bit_nt(
                        x, packed, absmax_f, st.code, BLOCKSIZE, n, xa * 0.5, lora_B, config="lora_" + c),
                        ref_lora, abytes))
            else:
                rows.append(dict(base, impl="triton", status="skip", note="Triton needs CUDA (or --interpret)"))
            cands.append(("cublas_bf16", False, lambda x=x: torch.matmul(x, w.t()), x.float() @ w.float().t(),
                          n * k * esz))
            if bnb is not None and m == 1:
                F, bp, bqs, bw = bnb
                cands.append(("bnb", False, lambda x=x: F.gemv_4bit(x, bp.t(), state=bqs), x.float() @ bw.t(),
                              bp.numel() + bqs.absmax.numel() * bqs.absmax.element_size()))
            elif bnb is None:
                rows.append(dict(base, impl="bnb", status="skip", note=bnb_reason))
            for impl, lora, fn, r_ref, nb in cands:
                def call(fn=fn):
                    with torch.no_grad():
                        return fn()
                row = b.row(dict(base, impl=impl, lora=lora, weight_read_bytes=nb), call,
                            lambda o, r_ref=r_ref: {"rel_err_y": b.rel_err(o, r_ref)}, tol=b.tol[dtype],
                            nbytes=nb + io, poison_specs=[((m, n), dtype)])
                if row.get("status") == "ok" and copy_gbps:
                    row["pct_copy"] = 100.0 * row["gbps"] / copy_gbps
                rows.append(row)
    table = _dispatch_table(rows, dev)
    rows.append({"impl": "dispatch", "status": "info", "entries": table["entries"],
                 "written_to": _write_table(table, dry)})
    return rows


def _dispatch_table(rows: list[dict], dev) -> dict:
    """Entries choosing cuda_c vs the fastest Triton kernel per (M, N, K, LoRA) from the timed rows."""
    from peft_kernels.ops import decode_dispatch

    cap = decode_dispatch.capability(dev)
    best: dict = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("impl") not in ("cuda_c", "triton_gemv", "triton_tiled"):
            continue
        key = (r["m"], r["n"], r["k"], r["dtype"], bool(r.get("lora")))
        choice = "cuda" if r["impl"] == "cuda_c" else r["impl"]
        best.setdefault(key, {})[choice] = r["ms"] * 1e3
    entries = []
    for (m, n, k, dname, lora), us in sorted(best.items()):
        entries.append({"capability": cap, "dtype": dname, "m": m, "n": n, "k": k, "lora": lora,
                        "choice": min(us, key=us.get), "us": {c: round(t, 2) for c, t in us.items()}})
    return {"version": 1, "default": "triton", "entries": entries}


def _write_table(table: dict, dry: bool) -> str:
    """Merge with the shipped table's other-GPU entries and write atomically; '' in the dry run."""
    if dry:
        return ""
    from peft_kernels.ops import decode_dispatch

    path = os.environ.get("PEFT_KERNELS_DECODE_TABLE_OUT") or os.path.join(os.environ.get("OUT", "."),
                                                                             "decode_dispatch.json")
    shipped = json.loads(decode_dispatch.TABLE_PATH.read_text())
    caps = {e["capability"] for e in table["entries"]}
    merged = dict(shipped, entries=[e for e in shipped.get("entries", []) if e["capability"] not in caps]
                  + table["entries"])
    merged["note"] = ("Decode (M <= 16) kernel choice per shape, measured by bench/gpu_suite.py section m; "
                      "see peft_kernels/ops/decode_dispatch.py.")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader never sees half a table
    return path


def _f(v, fmt):
    return "—" if v is None else format(v, fmt)


def render(rows: list[dict]) -> list[str]:
    lines = ["| K->N | M | LoRA | impl | us | GB/s (weight+io) | % copy | cublas_bf16 / impl | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    cublas = {(r["k"], r["n"], r["m"]): r["ms"] for r in rows
              if r.get("impl") == "cublas_bf16" and r.get("status") == "ok"}
    copy = {(r["k"], r["n"]): r for r in rows if r.get("impl") == "copy"}
    for r in rows:
        if r.get("impl") in ("copy", "dispatch") or "m" not in r:
            continue
        if r.get("status") != "ok":
            lines.append(f"- {r['k']}->{r['n']} M={r['m']} {r.get('impl')}: {r.get('status')} ({r.get('note', '')})")
            continue
        cb = cublas.get((r["k"], r["n"], r["m"]))
        lines.append(f"| {r['k']}->{r['n']} | {r['m']} | {'+lora' if r.get('lora') else ''} | {r['impl']} | "
                     f"{r['ms'] * 1e3:.1f} | {_f(r.get('gbps'), '.0f')} | {_f(r.get('pct_copy'), '.0f')} | "
                     f"{_f(cb / r['ms'] if cb else None, '.2f')} | {_f(r.get('rel_err_y'), '.1e')} |")
    for (k, n), c in copy.items():
        lines.append(f"- copy baseline {k}->{n} ({c.get('weight_bytes')} B): {_f(c.get('gbps'), '.0f')} GB/s "
                     f"({c.get('status')})")
    for r in rows:
        if r.get("impl") == "dispatch":
            lines.append(f"- dispatch entries: {len(r['entries'])}; written to {r['written_to'] or '(dry run: not written)'}")
            for e in r["entries"]:
                lines.append(f"  - {e['capability']} {e['dtype']} M={e['m']} {e['k']}->{e['n']} "
                             f"{'lora' if e['lora'] else 'base'}: {e['choice']} {e['us']}")
    lines += ["", "Targets (issue #6): M = 1, 4096->14336: cuda_c >= 75 % of copy bandwidth on the 4-bit weight, "
              ">= 2.5x faster than cublas_bf16."]
    return lines
