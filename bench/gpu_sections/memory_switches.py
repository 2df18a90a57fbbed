"""gpu_suite section l: the memory switches of issue #7 at Llama-3-8B shapes, each against what it replaces.

* ``embedding``: ``Embedding4bit`` (NF4 table, gather-dequant of the looked-up rows) vs ``nn.Embedding`` in the
  suite dtype, vocabulary 128256 x hidden 4096, 4096 token ids (dry: 1000 x 128, 64 ids); time, the table's
  bytes and the peak memory of the lookup. Checked against the rows of the dequantized (ours) / dense table.
* ``head``: ``Linear4bitHead`` (4-bit LM head 4096 -> 128256) forward + backward (dX) vs a frozen dense head
  in the suite dtype, 2048 tokens (dry: 48); checked against float32 y and dX from the same weights.
* ``checkpointing``: 2 Llama-3-8B-shaped decoder layers (4096 / 14336, GQA 32/8; dry: 128 / 448) with LoRA
  r=16 over 4-bit linears, one forward + backward over 2048 tokens (dry: 32): checkpointing off / on /
  on + offload to pinned memory (dry: the CopyTransfer stand-in); loss and one LoRA gradient checked against
  the run without checkpointing; peak memory of the step.

Peak memory (``peak_mib``, CUDA only) is ``max_memory_allocated`` during the call minus what was allocated
before it. Ratios (``render``) are against the baseline measured in the same run.
"""
from __future__ import annotations

import torch

TITLE = "Memory switches: 4-bit embedding / head vs dense, checkpointing with and without offload"


def _peak_mib(dev, fn):
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    del out
    return round(peak / 2 ** 20, 1)


def _tensor_mib(ts) -> float:
    return round(sum(t.numel() * t.element_size() for t in ts) / 2 ** 20, 2)


def run(b, cfg: dict, dry: bool) -> list[dict]:
    rows: list[dict] = []
    for part in (_embedding_rows, _head_rows, _checkpoint_rows):
        if b.out_of_time():
            break
        rows += part(b, cfg, dry)
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _w64(layer):
    from peft_kernels.ops import reference
    qs = layer.quant_state
    return reference.dequantize_4bit(layer.weight, qs.absmax_float(), qs.code, qs.blocksize, qs.numel,
                                     torch.float32).view(qs.shape)


def _embedding_rows(b, cfg, dry):
    from peft_kernels.nn import Embedding4bit
    dev, dtype = b.device, cfg["dtype"]
    v, h, m = (1000, 128, 64) if dry else (128256, 4096, 4096)
    torch.manual_seed(0)
    dense = torch.nn.Embedding(v, h, device=dev, dtype=dtype).requires_grad_(False)
    ours = Embedding4bit.from_embedding(dense)
    ids = torch.randint(0, v, (1, m), device=dev)
    w_q = _w64(ours)
    base = {"part": "embedding", "v": v, "h": h, "m": m, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for impl, mod, ref_w, ts in (("ours", ours, w_q, ours.quantized_weight_tensors()),
                                 ("dense", dense, dense.weight.float(), [dense.weight])):
        row = b.row(dict(base, impl=impl, table_mib=_tensor_mib(ts)), lambda mod=mod: mod(ids),
                    lambda o, ref_w=ref_w: {"rel_err_rows": b.rel_err(o, ref_w[ids])}, tol=b.tol[dtype])
        row["peak_mib"] = _peak_mib(dev, lambda mod=mod: mod(ids))
        rows.append(row)
    return rows


def _head_rows(b, cfg, dry):
    from peft_kernels.nn import Linear4bitHead
    dev, dtype = b.device, cfg["dtype"]
    v, h, m = (1000, 128, 48) if dry else (128256, 4096, 2048)
    torch.manual_seed(1)
    dense = torch.nn.Linear(h, v, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.mul_(h ** -0.5 / dense.weight.float().std().item())
    ours = Linear4bitHead.from_linear(dense)
    x = torch.randn(m, h, device=dev, dtype=dtype).requires_grad_(True)
    dy = torch.randn(m, v, device=dev, dtype=dtype)
    base = {"part": "head", "v": v, "h": h, "m": m, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for impl, mod, w, ts in (("ours", ours, _w64(ours), ours.quantized_weight_tensors()),
                             ("dense", dense, dense.weight.float(), [dense.weight])):
        ref_y, ref_dx = x.detach().float() @ w.t(), dy.float() @ w

        def step(mod=mod):
            y = mod(x)
            return y, torch.autograd.grad(y, x, dy)[0]
        row = b.row(dict(base, impl=impl, table_mib=_tensor_mib(ts)), step,
                    lambda o, ref_y=ref_y, ref_dx=ref_dx: {"rel_err_y": b.rel_err(o[0], ref_y),
                                                           "rel_err_dx": b.rel_err(o[1], ref_dx)},
                    tol=b.tol[dtype], flops=4.0 * m * v * h)
        row["peak_mib"] = _peak_mib(dev, step)
        rows.append(row)
    return rows


def _checkpoint_rows(b, cfg, dry):
    import transformers as tf
    from peft_kernels.methods.lora import LoraConfig
    from peft_kernels.prepare import prepare
    from peft_kernels.train.checkpointing import (ActivationOffloader, CopyTransfer, disable_checkpointing,
                                                  enable_checkpointing)
    dev, dtype = b.device, cfg["dtype"]
    d = cfg["decoder"]
    tokens = 32 if dry else 2048
    lcfg = tf.LlamaConfig(hidden_size=d["hidden"], intermediate_size=d["intermediate"], num_hidden_layers=2,
                          num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"], vocab_size=512,
                          max_position_embeddings=max(tokens, 64))
    torch.manual_seed(2)
    with torch.device(dev):
        model = tf.LlamaForCausalLM(lcfg).to(dtype)
    model, _ = prepare(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                         init_lora_weights="gaussian"), quantize=True)
    model.train()
    # a LoRA B: its gradient is non-zero at init (B = 0, A random), so the check compares something
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    ids = torch.randint(0, lcfg.vocab_size, (1, tokens), device=dev)

    def step():
        loss = model(ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, params[0])[0]

    ref_loss, ref_g = (t.float() for t in step())
    base = {"part": "checkpointing", "layers": 2, "hidden": d["hidden"], "tokens": tokens,
            "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for impl in ("off", "on", "on+offload"):
        if impl == "on":
            enable_checkpointing(model)
        elif impl == "on+offload":
            disable_checkpointing(model)
            off = ActivationOffloader(1, transfer=CopyTransfer()) if dev.type != "cuda" else None
            enable_checkpointing(model, offload=True, offloader=off)
        row = b.row(dict(base, impl=impl), step,
                    lambda o: {"rel_err_loss": b.rel_err(o[0], ref_loss), "rel_err_grad": b.rel_err(o[1], ref_g)},
                    tol=b.tol[dtype])
        row["peak_mib"] = _peak_mib(dev, step)
        rows.append(row)
    disable_checkpointing(model)
    return rows


def render(rows: list[dict]) -> list[str]:
    lines = ["| part | impl | shape | ms | x baseline | peak MiB | table MiB | status |", "|---|---|---|---|---|---|---|---|"]
    baseline = {"embedding": "dense", "head": "dense", "checkpointing": "off"}
    base_ms = {r["part"]: r.get("ms") for r in rows if r.get("impl") == baseline.get(r.get("part"))}
    for r in rows:
        shape = (f"{r.get('v')}x{r.get('h')}, m={r.get('m')}" if r.get("part") != "checkpointing"
                 else f"{r.get('layers')} layers, H={r.get('hidden')}, T={r.get('tokens')}")
        ms, bm = r.get("ms"), base_ms.get(r.get("part"))
        ratio = f"{ms / bm:.2f}" if ms and bm else "—"
        lines.append(f"| {r.get('part')} | {r.get('impl')} | {shape} | {'—' if ms is None else f'{ms:.3f}'} | "
                     f"{ratio} | {r.get('peak_mib') if r.get('peak_mib') is not None else '—'} | "
                     f"{r.get('table_mib', '—')} | {r.get('status')} |")
    return lines
