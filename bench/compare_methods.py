#!/usr/bin/env python3
"""Train the shipped demo model with every PEFT method on the same data; write a table and a plot.

    python bench/compare_methods.py [--steps 100] [--methods lora,qlora,...] [--out DIR] [--quick]
    peft-kernels bench --methods -- [same arguments]

Every method starts from the same pretrained demo model (``peft_kernels/assets/demo_model``) and
trains for the same number of steps with the same batches of ``demo_data.jsonl`` (chat questions
about the synthetic world the model was pretrained on), through ``peft_kernels.prepare`` and
``peft_kernels.train.Trainer``. Each row reports:

* trainable parameters (PEFT's count: a 4-bit weight counts its logical parameters);
* peak memory of one training step: on CPU the peak of live tensor storage
  (``peft_kernels.train.memory.measure_peak_bytes``: weights, gradients, optimizer state and
  activations that ATen operators touch), on CUDA ``torch.cuda.max_memory_allocated``;
* tokens/s over the steps after the measured one (input tokens, pads excluded);
* the training loss of the last step, the loss on held-out questions (``demo_data_eval.jsonl``,
  people whose conversations are not in the training set) and how many of them the model answers
  exactly right (greedy decoding);
* forgetting: the loss on held-out pretraining prose (``demo_pretrain_eval.txt``) after training
  minus before training (the prepared model, i.e. after quantization where the base is 4-bit).

Writes ``compare_methods.md`` (the table), ``compare_methods.json`` (all numbers) and
``compare_methods.png`` (a bar chart per column) to ``--out`` (default ``out/compare_methods``).
The learning rate of each method is its own (methods that train fewer parameters want a larger
one), set by hand so that every method learns the task in 100 steps; ``--lr METHOD=LR`` changes it.
Not a tuned optimum: on this task three times larger rates lower every method's task loss and
multiply its forgetting, three times smaller ones the reverse. All other settings are shared.
Timings on a shared CPU are noisy: compare tokens/s within one run only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/compare_methods.py` from a checkout without an install
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class MethodSpec:
    key: str                      # command-line name
    label: str                    # table name
    method: Optional[str]         # registry name (None: full fine-tuning)
    quantize: bool                # 4-bit NF4 base
    lr: float
    settings: dict = field(default_factory=dict)


#: The rows, in table order. LoRA runs over the dense base so that QLoRA's saving shows; every other PEFT
#: method runs over the 4-bit base, as it would be used; full fine-tuning (dense) is the reference.
#: The QLoRA row is `make demo`'s run (same rank, learning rate, steps, batch, warmup and seed).
SPECS = [
    MethodSpec("full", "Full fine-tuning", None, False, 5e-4),
    MethodSpec("lora", "LoRA (dense base)", "lora", False, 2e-3, {"r": 8, "lora_alpha": 16}),
    MethodSpec("qlora", "QLoRA", "lora", True, 2e-3, {"r": 8, "lora_alpha": 16}),
    MethodSpec("dora", "DoRA (4-bit base)", "dora", True, 2e-3, {"r": 8, "lora_alpha": 16}),
    MethodSpec("bitfit", "BitFit", "bitfit", True, 3e-2, {"train_norms": True}),
    MethodSpec("sparse", "Sparse (5%)", "sparse", True, 2e-3, {"density": 0.05}),
    MethodSpec("adapter", "Bottleneck adapters", "adapter", True, 2e-3, {}),
    MethodSpec("ia3", "IA3", "ia3", True, 5e-2, {}),
    MethodSpec("prompt_tuning", "Prompt tuning (16 tokens)", "prompt_tuning", True, 1e-1,
               {"num_virtual_tokens": 16}),
    MethodSpec("prefix_tuning", "Prefix tuning (8 tokens)", "prefix_tuning", True, 3e-2, {"num_virtual_tokens": 8}),
    MethodSpec("freeze", "Layer freezing (last block)", "freeze", True, 1e-3, {"last_k": 1}),
]
BY_KEY = {s.key: s for s in SPECS}


@dataclass
class Row:
    key: str
    label: str
    base: str
    lr: float
    trainable: int
    total: int
    peak_bytes: int
    tokens_per_s: float
    train_loss: float
    task_loss_before: float
    task_loss: float
    answers_right: int
    answers_asked: int
    pretrain_before: float
    pretrain_after: float
    seconds: float
    error: Optional[str] = None

    @property
    def forgetting(self) -> float:
        return self.pretrain_after - self.pretrain_before


def _method_cfg(spec: MethodSpec):
    if spec.method is None:
        return None
    from peft_kernels.demo import method_config

    settings = dict(spec.settings)
    r = settings.pop("r", 8)
    return method_config(spec.method, r, **settings)


def run_one(spec: MethodSpec, args, data) -> Row:
    """Train one method from the shipped model; returns its row (numbers as measured)."""
    import torch

    from peft_kernels.demo import answer_accuracy, load_causal_lm, text_loss
    from peft_kernels.prepare import prepare
    from peft_kernels.train.memory import measure_peak_bytes
    from peft_kernels.train.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(data["model_path"])
    model.to(args.device)
    model, report = prepare(model, _method_cfg(spec), quantize=spec.quantize, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    pretrain_before = text_loss(model, tokenizer, data["text_eval"], args.seq_len, max_docs=args.text_docs)
    with tempfile.TemporaryDirectory(prefix="compare_methods-") as tmp:
        cfg = TrainConfig(output_dir=tmp, max_steps=args.steps, batch_size=args.batch_size, lr=spec.lr,
                          warmup_steps=max(1, args.steps // 10), seq_len=args.seq_len, seed=args.seed,
                          progress=False, eval_batch_size=32)
        trainer = Trainer(model, tokenizer, cfg, data["train"], data["eval"])
        task_before = trainer.evaluate()
        # The first step runs under the memory tracker (slow on CPU): it is left out of tokens/s.
        _, peak = measure_peak_bytes(trainer.train_step, device="cuda" if args.device == "cuda" else "cpu")
        result = trainer.train() if args.steps > 1 else None
        task_after = trainer.evaluate()
    pretrain_after = text_loss(model, tokenizer, data["text_eval"], args.seq_len, max_docs=args.text_docs)
    right, asked = answer_accuracy(model, tokenizer, data["eval_records"], args.answers)
    return Row(key=spec.key, label=spec.label, base="4-bit NF4" if spec.quantize else "dense fp32", lr=spec.lr,
               trainable=report.trainable, total=report.total, peak_bytes=int(peak),
               tokens_per_s=result.tokens_per_s if result else float("nan"), train_loss=trainer.losses[-1],
               task_loss_before=task_before, task_loss=task_after, answers_right=right, answers_asked=asked,
               pretrain_before=pretrain_before,
               pretrain_after=pretrain_after, seconds=time.perf_counter() - t0)


# ===================================================================== outputs
def markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "# PEFT methods on the demo model",
        "",
        f"{meta['steps']} steps x batch {meta['batch_size']} on `{meta['model']}` ({meta['model_params']:,} "
        f"parameters), data `{meta['data']}`; {meta['device']}, {meta['threads']} threads; {meta['date']}.",
        f"Held-out task loss of the untrained base: {meta['task_loss_base']:.3f}. "
        f"Pretraining-text loss of the base: {meta['pretrain_base']:.3f} (dense), {meta['pretrain_base_4bit']:.3f} "
        f"(4-bit NF4).",
        "",
        "| method | base | lr | trainable params | trainable % | peak memory (MiB) | tokens/s | final train loss "
        "| held-out task loss | held-out answers right | pretrain-text loss after | forgetting (Δ) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | {r.base} | {r.lr:g} | error: {r.error} ||||||||")
            continue
        lines.append(
            f"| {r.label} | {r.base} | {r.lr:g} | {r.trainable:,} | {100 * r.trainable / max(r.total, 1):.2f} | "
            f"{r.peak_bytes / 2**20:,.1f} | {r.tokens_per_s:,.0f} | {r.train_loss:.3f} | {r.task_loss:.3f} | "
            f"{r.answers_right}/{r.answers_asked} | {r.pretrain_after:.3f} | {r.forgetting:+.3f} |")
    lines += [
        "",
        "Peak memory: one training step, " + ("`torch.cuda.max_memory_allocated`." if meta["device"] == "cuda" else
                                             "peak live tensor storage seen by ATen operators "
                                             "(`peft_kernels.train.memory.measure_peak_bytes`); on a model this "
                                             "small, activations and the embedding dominate."),
        "Answers: greedy answers to the held-out questions that equal the reference exactly "
        f"(the untrained base: {meta['answers_base']}).",
        "Forgetting: loss on held-out pretraining prose after training minus before training (the prepared model; "
        "a 4-bit base's own quantization loss is in the caption, not in Δ).",
        "tokens/s: input tokens (pads excluded) per second over the steps after the first; "
        + ("a shared CPU: compare within one run only." if meta["device"] == "cpu" else "one GPU."),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    labels = [r.label for r in ok]
    panels = [
        ("trainable parameters", [r.trainable for r in ok], True),
        ("peak memory of a step (MiB)", [r.peak_bytes / 2**20 for r in ok], False),
        ("tokens/s", [r.tokens_per_s for r in ok], False),
        ("held-out task loss (lower is better)", [r.task_loss for r in ok], False),
        ("forgetting: Δ pretrain-text loss", [r.forgetting for r in ok], False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.42 * len(ok) + 1.6), sharey=True)
    colors = ["#555555" if r.key == "full" else "#2a7ab9" for r in ok]  # the reference in grey
    for ax, (title, values, log) in zip(axes, panels):
        ax.barh(range(len(values)), values, color=colors)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
        ax.axvline(0, color="black", linewidth=0.6)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=9)
    axes[0].invert_yaxis()
    fig.suptitle(f"PEFT methods on the demo model: {meta['steps']} steps, batch {meta['batch_size']}, "
                 f"{meta['device']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ===================================================================== main
def _load_data(args) -> dict:
    from peft_kernels import demo
    from peft_kernels.train.data import load_records, tokenize_records

    _, tokenizer = demo.load_causal_lm(demo.DEMO_MODEL)
    train = tokenize_records(load_records(demo.DEMO_DATA), tokenizer, args.seq_len)
    eval_records = load_records(demo.DEMO_EVAL)
    evals = tokenize_records(eval_records, tokenizer, args.seq_len)
    if args.quick:
        evals = evals[:16]
    return {"model_path": demo.DEMO_MODEL, "train": train, "eval": evals, "eval_records": eval_records,
            "text_eval": demo.DEMO_PRETRAIN_EVAL, "tokenizer": tokenizer}


def _baselines(args, data) -> dict:
    """Losses of the untrained base, dense and 4-bit (the forgetting and task-loss reference points)."""
    from peft_kernels.demo import answer_accuracy, load_causal_lm, text_loss
    from peft_kernels.quant.model import quantize_model
    from peft_kernels.train.trainer import TrainConfig, Trainer

    model, tok = load_causal_lm(data["model_path"])
    model.to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    dense = text_loss(model, tok, data["text_eval"], args.seq_len, max_docs=args.text_docs)
    for p in model.parameters():
        p.requires_grad_(True)  # the Trainer refuses a model with nothing to train; evaluate() changes nothing
    with tempfile.TemporaryDirectory() as tmp:
        task = Trainer(model, tok, TrainConfig(output_dir=tmp, max_steps=1, progress=False, seq_len=args.seq_len,
                                               eval_batch_size=32), data["train"][:1], data["eval"]).evaluate()
    right, asked = answer_accuracy(model, tok, data["eval_records"], args.answers)
    quantize_model(model)
    q = text_loss(model, tok, data["text_eval"], args.seq_len, max_docs=args.text_docs)
    return {"pretrain_base": dense, "pretrain_base_4bit": q, "task_loss_base": task,
            "answers_base": f"{right}/{asked}", "model_params": n_params}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(s.key for s in SPECS),
                   help=f"comma list of {', '.join(BY_KEY)} (default: all)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="override a method's learning rate (repeatable), e.g. --lr prompt_tuning=0.1")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--answers", type=int, default=32, help="held-out questions to answer (exact-match count)")
    p.add_argument("--text-docs", type=int, default=150, help="pretraining documents for the forgetting loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", default="out/compare_methods", help="folder for the .md, .json and .png")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, 16 documents, 16 eval examples, "
                                                        "2 answers")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.text_docs, args.answers = min(args.steps, 3), min(args.text_docs, 16), min(args.answers, 2)
    unknown = [m for m in args.methods.split(",") if m not in BY_KEY]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(BY_KEY)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.lrs = {}
    for item in args.lr:
        key, _, value = item.partition("=")
        try:
            args.lrs[key] = float(value)
        except ValueError:
            p.error(f"--lr expects METHOD=LR, got {item!r}")
        if key not in BY_KEY or args.lrs[key] <= 0:
            p.error(f"--lr {item!r}: method must be one of {', '.join(BY_KEY)} and LR > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per method would bury the table
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(args)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "model": "peft_kernels/assets/demo_model", "data": "peft_kernels/assets/demo_data.jsonl",
            "device": args.device, "threads": torch.get_num_threads(), "quick": args.quick,
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count()}
    meta.update(_baselines(args, data))
    rows = []
    for key in args.methods.split(","):
        spec = BY_KEY[key]
        if key in args.lrs:
            spec = dataclasses.replace(spec, lr=args.lrs[key])
        try:
            row = run_one(spec, args, data)
        except Exception as e:  # one broken method must not hide the others' numbers
            if os.environ.get("PEFT_KERNELS_DEBUG"):
                raise
            row = Row(key=spec.key, label=spec.label, base="4-bit NF4" if spec.quantize else "dense fp32", lr=spec.lr,
                      trainable=0, total=0, peak_bytes=0, tokens_per_s=0.0, train_loss=float("nan"),
                      task_loss_before=float("nan"), task_loss=float("nan"), answers_right=0, answers_asked=0,
                      pretrain_before=float("nan"),
                      pretrain_after=float("nan"), seconds=0.0, error=f"{type(e).__name__}: {e}".splitlines()[0][:200])
        rows.append(row)
        if row.error:
            print(f"{spec.label:30s} ERROR {row.error}", flush=True)
        else:
            print(f"{spec.label:30s} trainable {row.trainable:>9,}  peak {row.peak_bytes / 2**20:7.1f} MiB  "
                  f"{row.tokens_per_s:8,.0f} tok/s  task loss {row.task_loss_before:.3f} -> {row.task_loss:.3f}  "
                  f"right {row.answers_right}/{row.answers_asked}  "
                  f"forgetting {row.forgetting:+.3f}  ({row.seconds:.0f} s)", flush=True)
    (out / "compare_methods.md").write_text(markdown(rows, meta))
    (out / "compare_methods.json").write_text(json.dumps(
        {"meta": meta, "rows": [{**asdict(r), "forgetting": r.forgetting} for r in rows]}, indent=1, default=str))
    plot(rows, out / "compare_methods.png", meta)
    print(f"\nwrote {out / 'compare_methods.md'}, {out / 'compare_methods.json'}, {out / 'compare_methods.png'}")
    print(markdown(rows, meta))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
