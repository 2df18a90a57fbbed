"""`make demo`: quantize a small Llama-shaped transformers model to 4-bit and report.

Builds the model from a config (no download), keeps a 16-bit copy, quantizes
the linear layers in place (lm_head stays 16-bit), and prints: bits per
parameter, model memory before/after, the 4-bit model's output error against
the 16-bit model, and forward+backward timings of both on this machine.

    python -m peft_kernels.demo [--layers 4] [--hidden 512] [--seq 128] [--batch 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from .ops import backend
from .quant.model import quantize_model


def _build_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=max(512, args.seq),
                      tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm()).item()


def _weight_error(model16: torch.nn.Module, model4: torch.nn.Module) -> float:
    """Mean relative error of dequantized 4-bit weights against the 16-bit originals."""
    from .nn import Linear4bit

    dense = dict(model16.named_modules())
    errs = [_rel_err(m.dequantize(torch.float32), dense[name].weight)
            for name, m in model4.named_modules() if isinstance(m, Linear4bit)]
    return sum(errs) / len(errs)


def _time_fwd_bwd(model: torch.nn.Module, embeds: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward (gradient w.r.t. the input embeddings; weights frozen)."""
    times = []
    for i in range(repeats + 1):
        x = embeds.detach().requires_grad_()
        t0 = time.perf_counter()
        logits = model(inputs_embeds=x).logits
        logits.float().logsumexp(-1).mean().backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model16 = _build_model(args)
    for prm in model16.parameters():
        prm.requires_grad_(False)
    model4 = copy.deepcopy(model16)
    report = quantize_model(model4, compute_dtype=torch.bfloat16)

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    with torch.no_grad():
        out16 = model16(input_ids=ids, output_hidden_states=True)
        out4 = model4(input_ids=ids, output_hidden_states=True)
    hid_err = _rel_err(out4.hidden_states[-1], out16.hidden_states[-1])
    logit_err = _rel_err(out4.logits, out16.logits)
    w_err = _weight_error(model16, model4)

    embeds = model16.get_input_embeddings()(ids)
    t16 = _time_fwd_bwd(model16, embeds, args.repeats)
    t4 = _time_fwd_bwd(model4, embeds, args.repeats)

    dev = "cpu"
    print(f"peft_kernels demo: Llama-shaped model, {args.layers} layers, hidden {args.hidden}, "
          f"vocab {args.vocab}, bf16; input {args.batch}x{args.seq} tokens on {dev} "
          f"(backend: {backend.select(torch.device(dev))})")
    print(report)
    print(f"error vs the 16-bit model (relative Frobenius): weights {w_err:.4f} (mean over layers), "
          f"final hidden states {hid_err:.4f}, logits {logit_err:.4f}")
    print(f"forward+backward (input grad), median of {args.repeats}: 16-bit {t16 * 1e3:.1f} ms, "
          f"4-bit {t4 * 1e3:.1f} ms (x{t4 / t16:.2f})")
    if dev == "cpu":
        print("note: on CPU the 4-bit path is the plain-torch reference, which dequantizes each weight per call; "
              "the fused kernels run on CUDA (see bench/).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
