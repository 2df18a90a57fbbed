"""`make demo`: a real QLoRA fine-tune, on the CPU, of a model and data set that ship with the package.

The default model (``peft_kernels/assets/demo_model``) is a 0.9 M-parameter Llama-architecture LM that
``scripts/make_demo_assets.py`` pretrained on generated text about a small synthetic world: prose
("Hugo has a horse. The home of Hugo is in Greystone.") and prose quizzes ("Question: Where is the
home of Hugo? Answer: Hugo lives in Greystone."). The default data (``demo_data.jsonl``) are chat
conversations about that world ("Where does Alice live?" -> "The home of Alice is in Amberly."):
the base model knows the facts but has never seen the chat template's role tokens, so it rambles on
in prose. The demo

1. loads the model and tokenizer, quantizes every linear layer to 4-bit NF4 and adds LoRA adapters
   (``peft_kernels.prepare``), printing the trainable-parameter / memory report;
2. measures, on held-out questions about people whose conversations are not in the training set,
   the task loss and how many greedy answers are exactly right; the loss on held-out pretraining
   text; and two sample answers;
3. trains with ``peft_kernels.train.Trainer`` (progress bar with loss, tokens/s and memory);
4. measures the same again and saves the adapter (PEFT's format) to ``<out>/adapter``.

    python -m peft_kernels.demo                       # or: peft-kernels demo, make demo
    python -m peft_kernels.demo --model PATH --data FILE [--eval-data FILE] [--steps N] [--out DIR]

``--model`` is any local transformers causal LM directory (config.json + weights + tokenizer);
``--data`` a JSONL/JSON/text/datasets file in any format ``peft_kernels.train.data`` reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"
DEMO_DATA = ASSETS / "demo_data.jsonl"
DEMO_EVAL = ASSETS / "demo_data_eval.jsonl"
DEMO_PRETRAIN_EVAL = ASSETS / "demo_pretrain_eval.txt"

#: Training settings tuned for the shipped model (lr is larger than for real LLMs: the model is tiny).
DEMO_DEFAULTS = {"steps": 100, "batch_size": 16, "lr": 2e-3, "r": 8, "seq_len": 128}
#: Settings for ``--model``: the usual QLoRA learning rate.
MODEL_DEFAULTS = {"steps": 100, "batch_size": 4, "lr": 2e-4, "r": 16, "seq_len": 512}


class ModelPathError(ValueError):
    """The path given as a model is not a transformers causal LM directory (the message says why)."""


# ===================================================================== loading
def _weight_files(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth")
                  or f.name.endswith(".safetensors.index.json") or f.name.endswith(".bin.index.json"))


def check_model_dir(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it looks like a transformers model directory, else ModelPathError saying why."""
    p = Path(path)
    if not p.exists():
        raise ModelPathError(f"model path {p} does not exist")
    if not p.is_dir():
        raise ModelPathError(f"model path {p} is a file, not a model directory (expected a folder with config.json "
                             f"and weights, as save_pretrained writes)")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise ModelPathError(f"{p} holds an adapter (adapter_config.json), not a model: pass the base model as "
                                 f"--model and the adapter with --adapter")
        raise ModelPathError(f"{p} is not a model directory: no config.json in it")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelPathError(f"{p / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelPathError(f"{p / 'config.json'} is not a transformers model config (no model_type)")
    if not _weight_files(p):
        raise ModelPathError(f"{p} has a config.json but no weights (*.safetensors or *.bin)")
    return p


def load_causal_lm(path: str | os.PathLike, *, dtype=None, tokenizer_path: Optional[str] = None):
    """(model, tokenizer) from a local directory, offline. ModelPathError for anything that is not one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise ModelPathError(f"{p}: transformers cannot read its config.json: {type(e).__name__}: {e}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelPathError(f"{p}: model_type {config.model_type!r} is not a causal language model transformers "
                             f"knows (AutoModelForCausalLM cannot load it)")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or torch.float32, local_files_only=True)
    except Exception as e:
        raise ModelPathError(f"{p}: loading the weights failed: {type(e).__name__}: {e}") from None
    tp = Path(tokenizer_path) if tokenizer_path else p
    try:
        tokenizer = AutoTokenizer.from_pretrained(tp, local_files_only=True)
    except Exception as e:
        raise ModelPathError(f"{tp}: no usable tokenizer there ({type(e).__name__}: {e}); "
                             f"pass --tokenizer DIR") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; pads never carry a label
    model.eval()
    return model, tokenizer


# ===================================================================== measuring
@dataclass
class Sample:
    prompt: str          # what the model is given (rendered)
    expected: str        # the reference answer from the data
    question: str        # a short human-readable form of the prompt


def _prompt_of(rec: dict) -> tuple[list[dict] | str, str]:
    """(conversation without the last assistant turn | plain prompt, expected answer) of one record."""
    if "messages" in rec:
        msgs = rec["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant") if any(
            m["role"] == "assistant" for m in msgs) else len(msgs)
        return msgs[:last], (msgs[last]["content"] if last < len(msgs) else "")
    if "instruction" in rec:
        user = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
        return [{"role": "user", "content": user}], rec["output"]
    if "prompt" in rec:
        return [{"role": "user", "content": rec["prompt"]}], rec.get("completion", rec.get("response", ""))
    words = rec["text"].split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def make_sample(rec: dict, tokenizer) -> Sample:
    conv, expected = _prompt_of(rec)
    if isinstance(conv, str):
        return Sample(prompt=conv, expected=expected, question=conv)
    question = conv[-1]["content"] if conv else ""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    else:  # the same plain layout peft_kernels.train.data uses without a template
        prompt = (rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "") + "\n\n"
                  if "instruction" in rec else question)
    return Sample(prompt=prompt, expected=expected, question=question)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (decoded, special tokens dropped, up to the first EOS)."""
    import torch

    device = next(model.parameters()).device
    # Chat templates already put the BOS in the text; plain prompts get the tokenizer's usual specials.
    has_bos = tokenizer.bos_token and prompt.startswith(tokenizer.bos_token)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=not has_bos)
    ids = enc["input_ids"].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def answer_accuracy(model, tokenizer, records: list[dict], max_records: int = 32) -> tuple[int, int]:
    """(exactly right greedy answers, asked) over the first ``max_records`` records with a reference answer."""
    asked = right = 0
    for rec in records[:max_records]:
        smp = make_sample(rec, tokenizer)
        if not smp.expected:
            continue
        asked += 1
        right += generate(model, tokenizer, smp.prompt) == smp.expected.strip()
    return right, asked


def text_loss(model, tokenizer, path: Path, seq_len: int, max_docs: int = 200, batch_size: int = 32) -> float:
    """Mean next-token loss over (the first ``max_docs``) documents of a text file: the "forgetting" measure.

    Documents are padded into batches (attention mask on, pads carry no label); prompt/prefix-tuning
    wrappers are measured as they run, virtual tokens included."""
    import torch

    from .train.data import count_label_tokens, epoch_batches, load_records, tokenize_records
    from .train.trainer import causal_lm_loss_sum

    records = load_records(path)[:max_docs]
    examples = tokenize_records(records, tokenizer, seq_len, responses_only=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = epoch_batches(examples, batch_size, packing=False, pad_token_id=pad, seed=0, epoch=0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                               use_cache=False).logits
                total += float(causal_lm_loss_sum(logits, b["labels"].to(device)))
                count += count_label_tokens(b)
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ===================================================================== the run
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local transformers causal LM directory (default: the shipped demo model)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--data", help="training data file (default: the shipped demo conversations)")
    p.add_argument("--eval-data", help="held-out data for the before/after loss (default: the shipped held-out "
                                       "questions with the demo data, else 10%% of --data)")
    p.add_argument("--text-eval", help="plain-text file whose loss shows forgetting (default with the demo model: "
                                       "its held-out pretraining text)")
    p.add_argument("--method", default="lora", help="PEFT method name (lora, dora, bitfit, ia3, adapter, ...)")
    p.add_argument("--no-quantize", action="store_true", help="keep the base in 16/32-bit (LoRA instead of QLoRA)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--r", type=int, help="LoRA rank")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--out", default="out/demo", help="output folder: checkpoints and <out>/adapter (default out/demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-answers", type=int, default=32, help="held-out questions answered for the exact-match "
                                                                   "count (default 32; 0 skips)")
    p.add_argument("--text-docs", type=int, default=200, help="documents of --text-eval to measure (default 200)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _settings(args) -> dict:
    base = DEMO_DEFAULTS if args.model is None else MODEL_DEFAULTS
    return {"steps": args.steps or base["steps"], "batch_size": args.batch_size or base["batch_size"],
            "lr": args.lr or base["lr"], "r": args.r or base["r"], "seq_len": args.seq_len or base["seq_len"]}


#: Settings each method gets when only its name is given (``--method NAME``): the method's own defaults,
#: plus what a method needs to be usable at all (freeze: which layers train; prompt tuning: how many tokens).
METHOD_DEFAULTS = {
    "lora": {"target_modules": "all-linear"},
    "dora": {"target_modules": "all-linear"},
    "sparse": {"density": 0.05},
    "freeze": {"last_k": 1},
    "prompt_tuning": {"num_virtual_tokens": 8},
    "prefix_tuning": {"num_virtual_tokens": 8},
}


def method_config(name: str, r: int = 8, **overrides):
    """A method config by name with :data:`METHOD_DEFAULTS` (LoRA/DoRA: rank ``r``, alpha 2r, all linears)."""
    from .methods.registry import ALIASES, config_from_dict

    key = name.strip().lower().replace("-", "_")
    canon = key if key in METHOD_DEFAULTS or key not in ALIASES else ALIASES[key][0]
    settings = dict(METHOD_DEFAULTS.get(key, METHOD_DEFAULTS.get(canon, {})))
    if key in ("lora", "dora"):
        settings.update(r=r, lora_alpha=2 * r)
    settings.update(overrides)
    return config_from_dict(key, settings)


def _split_eval(records: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out 10% (at most 64, at least 1) of the records when there are 10 or more; else evaluate on all."""
    import random

    if len(records) < 10:
        return records, records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(64, max(1, len(records) // 10))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


@dataclass
class DemoResult:
    """What :func:`fine_tune` did (the trained model stays usable: ``model`` and ``tokenizer``)."""

    model: Any
    tokenizer: Any
    train: Any                          # TrainResult
    train_seconds: float
    loss_before: float                  # held-out task loss
    loss_after: float
    correct_before: tuple               # (right, asked): exact greedy answers to held-out questions
    correct_after: tuple
    text_loss_before: Optional[float]   # loss on the forgetting text (None without one)
    text_loss_after: Optional[float]
    text_eval: Optional[Path]
    samples: list                       # (label, Sample, before, after)
    adapter_dir: Path
    device: Any


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return torch.device(name)


def fine_tune(args) -> DemoResult:
    """Load, prepare (4-bit + method), measure, train, measure again, save the adapter; prints as it goes."""
    import torch

    from .methods.registry import save_adapters
    from .prepare import prepare
    from .train.data import load_records, tokenize_records
    from .train.trainer import TrainConfig, Trainer

    default_model = args.model is None
    s = _settings(args)
    device = _resolve_device(args.device)
    torch.manual_seed(args.seed)  # the adapters' initialisation: the same run every time
    cfg_method = method_config(args.method, s["r"])  # a bad method name fails before anything loads
    model_path = Path(args.model) if args.model else DEMO_MODEL
    data_path = Path(args.data) if args.data else DEMO_DATA
    model, tokenizer = load_causal_lm(model_path, tokenizer_path=args.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    records = load_records(data_path)
    if args.eval_data:
        train_records, eval_records = records, load_records(args.eval_data)
    elif args.data is None and DEMO_EVAL.exists():
        train_records, eval_records = records, load_records(DEMO_EVAL)
    else:
        train_records, eval_records = _split_eval(records, args.seed)
    text_eval = Path(args.text_eval) if args.text_eval else (DEMO_PRETRAIN_EVAL if default_model else None)
    train_ex = tokenize_records(train_records, tokenizer, s["seq_len"])
    eval_ex = tokenize_records(eval_records, tokenizer, s["seq_len"])

    what = "the shipped demo model" if default_model else str(model_path)
    print(f"model: {what} ({type(model).__name__}, {n_params:,} parameters)")
    print(f"data: {data_path} ({len(train_ex)} training examples, {len(eval_ex)} held-out)")
    model.to(device)
    model, report = prepare(model, cfg_method, quantize=not args.no_quantize, seq_len=s["seq_len"],
                            batch_size=s["batch_size"])
    print(report)

    picks = [("held-out", eval_records[0]), ("training", train_records[0])]
    samples = [(label, make_sample(rec, tokenizer)) for label, rec in picks]
    before_gen = [generate(model, tokenizer, smp.prompt) for _, smp in samples]
    correct_before = answer_accuracy(model, tokenizer, eval_records, args.eval_answers)
    docs = args.text_docs
    text_before = text_loss(model, tokenizer, text_eval, s["seq_len"], max_docs=docs) if text_eval else None

    cfg = TrainConfig(output_dir=str(Path(args.out) / "run"), max_steps=s["steps"], batch_size=s["batch_size"],
                      lr=s["lr"], warmup_steps=max(1, s["steps"] // 10), seq_len=s["seq_len"], seed=args.seed,
                      log_every=5, progress=not args.no_progress, eval_batch_size=32)
    trainer = Trainer(model, tokenizer, cfg, train_ex, eval_ex)
    loss_before = trainer.evaluate()
    threads = f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else ""
    print(f"\ntraining {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']:g} on {device}{threads}")
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    loss_after = trainer.evaluate()
    after_gen = [generate(model, tokenizer, smp.prompt) for _, smp in samples]
    correct_after = answer_accuracy(model, tokenizer, eval_records, args.eval_answers)
    text_after = text_loss(model, tokenizer, text_eval, s["seq_len"], max_docs=docs) if text_eval else None
    adapter_dir = save_adapters(model, Path(args.out) / "adapter")
    return DemoResult(model=model, tokenizer=tokenizer, train=result, train_seconds=train_s, loss_before=loss_before,
                      loss_after=loss_after, correct_before=correct_before, correct_after=correct_after,
                      text_loss_before=text_before, text_loss_after=text_after,
                      text_eval=text_eval,
                      samples=[(lab, smp, b, a) for (lab, smp), b, a in zip(samples, before_gen, after_gen)],
                      adapter_dir=adapter_dir, device=device)


def run(args) -> int:
    """:func:`fine_tune` and print the before/after summary."""
    from transformers.utils import logging as hf_logging

    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar; the training bar is ours
    r = fine_tune(args)
    res = r.train
    print(f"\ntrained {res.steps} steps in {r.train_seconds:.1f} s ({res.tokens_per_s:,.0f} tokens/s); "
          f"training loss {res.losses[0]:.3f} (first step) -> {res.losses[-1]:.3f} (last step)")
    print(f"held-out task loss:      {r.loss_before:.3f} before -> {r.loss_after:.3f} after")
    if r.correct_before[1]:
        print(f"held-out answers right:  {r.correct_before[0]}/{r.correct_before[1]} before -> "
              f"{r.correct_after[0]}/{r.correct_after[1]} after (greedy, exact match)")
    if r.text_loss_before is not None:
        print(f"pretraining-text loss:   {r.text_loss_before:.3f} before -> {r.text_loss_after:.3f} after "
              f"({r.text_eval.name}; a rise is forgetting)")
    for label, smp, before, after in r.samples:
        print(f"\nsample ({label} question): {smp.question!r}")
        print(f"  before:   {before!r}")
        print(f"  after:    {after!r}")
        print(f"  expected: {smp.expected!r}")
    print(f"\nadapter saved to {r.adapter_dir}")
    print("  load it: peft_kernels.methods.registry.load_adapters(model, dir) (LoRA: also PEFT's "
          "PeftModel.from_pretrained)")
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peft_kernels.demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    return run_cli(args)


def run_cli(args) -> int:
    """``run`` with the expected failures (bad model path, bad data, bad settings) as one-line errors, exit 2
    (``PEFT_KERNELS_DEBUG=1`` shows the traceback instead)."""
    from .train.data import DataError

    try:
        return run(args)
    except (ModelPathError, DataError, FileNotFoundError, ValueError) as e:
        if os.environ.get("PEFT_KERNELS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
