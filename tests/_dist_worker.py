"""One rank of the multi-process training tests (tests/test_distributed.py); not collected by pytest.

Started by ``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/_dist_worker.py
--runner loop|trainer --strategies ddp,fsdp2[,fsdp2-replicated] --steps N --out DIR``. For each strategy it
builds the tiny 4-bit llama with LoRA (:func:`build_model`, the same on every rank), wraps it with
``peft_kernels.train.distributed.wrap_model`` and trains:

* ``loop``: a minimal SGD loop (:func:`train_loop`), optionally with gradient checkpointing; at step s the
  global batch is :func:`global_batch` (s) and rank r trains on rows ``[r*B, (r+1)*B)`` of it. The test runs
  the same loop in one process on the whole global batch and compares.
* ``trainer``: ``peft_kernels.train.trainer.Trainer`` with ``TrainConfig(distributed=strategy)``.

Each rank writes ``DIR/<runner>_<strategy>_rank<r>.json`` (losses, ``adapters_identical``, what a 4-bit layer
saw in its forward, sharding facts, a digest of the 4-bit bytes) and ``DIR/<runner>_<strategy>_rank<r>.safetensors``
(its full trainable tensors), so the test checks every rank's result itself.

The functions above are also imported by the test for the single-process reference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from _tiny_models import VOCAB, build  # noqa: E402

#: rows per rank per step, sequence length, LoRA rank, the loop's SGD learning rate
ROWS, SEQ, RANK_R, LR = 2, 12, 4, 0.5
#: the Trainer's AdamW learning rate
TRAINER_LR = 1e-2


def build_model(seed: int = 0):
    """The tiny llama (hidden 64, 2 layers) quantized to NF4, with LoRA r=4 on every linear layer; train mode."""
    from peft_kernels.methods import lora
    from peft_kernels.quant import quantize_model

    model = build("llama", seed=seed)
    quantize_model(model)
    model = lora.apply(model, lora.LoraConfig(r=RANK_R, lora_alpha=2 * RANK_R, target_modules="all-linear"))
    # LoRA B starts at zero; a non-zero start makes the adapters' gradients (and the comparison) non-trivial.
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def global_batch(step: int, world: int) -> torch.Tensor:
    """Token ids [world * ROWS, SEQ] for ``step``; a repeated pattern plus noise, so the loss can fall fast."""
    g = torch.Generator().manual_seed(1000 + step)
    base = torch.arange(SEQ) * 5 % VOCAB
    ids = base.expand(world * ROWS, SEQ).clone()
    noise = torch.randint(0, VOCAB, ids.shape, generator=g)
    keep = torch.rand(ids.shape, generator=g) < 0.8
    return torch.where(keep, ids, noise)


def rank_batch(step: int, world: int, rank: int) -> torch.Tensor:
    """This rank's rows of :func:`global_batch`."""
    return global_batch(step, world)[rank * ROWS:(rank + 1) * ROWS]


def make_optimizer(params):
    """Plain SGD with momentum for the loop: unlike Adam it is not invariant to the gradient's scale, so a
    sum where a mean belongs (or any wrong averaging) changes the result."""
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def train_loop(model, steps: int, batch_fn, on_loss=None, grad_scale: float = 1.0) -> list[float]:
    """:func:`make_optimizer` on ``batch_fn(step)`` for ``steps`` steps; the causal-LM loss (mean over the
    batch's tokens). ``on_loss(loss) -> float`` turns the local loss into the logged one (default ``.item()``).
    ``grad_scale`` multiplies the loss before backward (the test's "summed instead of averaged" control).
    The optimizer is built here, after any wrapping: FSDP2 replaces the parameter objects."""
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    losses = []
    for step in range(steps):
        ids = batch_fn(step)
        loss = model(input_ids=ids, labels=ids).loss
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(on_loss(loss.detach()) if on_loss else loss.item())
    return losses


def base_digest(model) -> str:
    """sha256 over every 4-bit layer's full packed bytes (gathered from the shards under FSDP2), in name order."""
    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.train.distributed import _full

    h = hashlib.sha256()
    for name, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
        if isinstance(m, Linear4bit):
            h.update(name.encode())
            h.update(_full(m.weight).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seen_by_linear4bit(model) -> dict:
    """Hook the first LoRA layer over a Linear4bit: records the type and shape of the base's packed ``weight``
    at the moment the layer's forward runs (LoraLinear hands it to the fused 4-bit op itself)."""
    from peft_kernels.nn.linear4bit import Linear4bit

    name, layer = next((n, m) for n, m in model.named_modules()
                       if isinstance(getattr(m, "base_layer", None), Linear4bit))
    base = layer.base_layer
    seen = {"layer": name, "expected_shape": [(base.in_features * base.out_features + 1) // 2, 1],
            "forward_types": []}

    def hook(mod, args):
        w = mod.base_layer.weight
        seen["forward_types"].append(type(w).__name__)
        seen["forward_shape"] = list(w.shape)
        seen["forward_dtype"] = str(w.dtype)

    layer.register_forward_pre_hook(hook)
    return seen


def _shard_facts(model) -> dict:
    """Local vs global element counts of the first 4-bit weight and the first trainable parameter."""
    from torch.distributed.tensor import DTensor

    from peft_kernels.nn.linear4bit import Linear4bit

    facts = {}
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    adapter = next(p for p in model.parameters() if p.requires_grad)
    for key, p in (("base", layer.weight), ("adapter", adapter)):
        local = p.to_local() if isinstance(p, DTensor) else p
        facts[key] = {"type": type(p).__name__, "local_numel": local.numel(), "numel": p.numel(),
                      "dtype": str(p.dtype)}
    return facts


def run_loop(strategy: str, steps: int, grad_ckpt: bool = False) -> dict:
    from peft_kernels.train import distributed as D

    world, rank, dev = D.world_size(), D.rank(), D.device()
    model = build_model().to(dev)
    if grad_ckpt:  # before wrapping, as prepare() does; recomputation then runs inside the FSDP2 units
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = _seen_by_linear4bit(model)
    if strategy == "fsdp2-replicated":  # FSDP2 over the adapters etc., the frozen 4-bit bases left whole
        wrapped = D.wrap_model(model, "fsdp2", shard_frozen=False)
    else:
        wrapped = D.wrap_model(model, strategy)
    facts = _shard_facts(D.unwrap_model(wrapped))
    local = []

    def on_loss(loss):
        local.append(loss.item())
        return D.all_reduce_mean(loss).item()  # the global mean: every rank has as many label tokens

    losses = train_loop(wrapped, steps, lambda s: rank_batch(s, world, rank).to(dev), on_loss)
    return {"losses": losses, "local_losses": local, "seen": seen, "shards": facts, "model": wrapped,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}


def trainer_examples(n: int) -> list[dict]:
    """``n`` tokenized examples (input_ids / labels lists) of 5..SEQ tokens: the ranks' batches hold different
    numbers of label tokens, so the loss must be normalised by the global count to match one process."""
    g = torch.Generator().manual_seed(77)
    out = []
    for i in range(n):
        length = int(torch.randint(5, SEQ + 1, (), generator=g))
        ids = global_batch(i, 1)[0, :length].tolist()
        labels = [-100] * 2 + ids[2:]  # a two-token "prompt" without loss
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Tok:
    """The least a Trainer asks of a tokenizer for pre-tokenized examples (the pad id)."""

    pad_token_id = 0
    eos_token_id = 0


def run_trainer(strategy, steps: int, out: Path, *, world: int, grad_accum: int = 1, save: bool = False) -> dict:
    """``Trainer`` on :func:`trainer_examples` with ``distributed=strategy``; batch ROWS per rank and
    micro-step, so one step sees ``grad_accum * world`` batches (one process with ``grad_accum=world`` sees the
    same ones). The Trainer's default gradient clipping (max_grad_norm 1.0) is on: it needs the global norm."""
    from peft_kernels.train.trainer import TrainConfig, Trainer

    from peft_kernels.train import distributed as D

    model = build_model().to(D.device())
    cfg = TrainConfig.from_dict({
        "output_dir": str(out / f"trainer_{strategy}"), "max_steps": steps, "batch_size": ROWS,
        "grad_accum": grad_accum, "lr": TRAINER_LR, "scheduler": "constant", "seq_len": SEQ, "progress": False,
        "distributed": strategy, "seed": 0, "save_every": steps if save else None})
    trainer = Trainer(model, _Tok(), cfg, trainer_examples(4 * steps * world * grad_accum))
    result = trainer.train()
    return {"losses": [float(x) for x in result.losses], "model": trainer.train_model,
            "checkpoint": result.checkpoint}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runner", choices=("loop", "trainer"), default="loop")
    ap.add_argument("--strategies", default="ddp,fsdp2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--save", action="store_true", help="trainer: write a checkpoint at the last step")
    ap.add_argument("--grad-ckpt", action="store_true", help="loop: gradient checkpointing (non-reentrant)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from peft_kernels.train import distributed as D

    assert D.init_from_env(timeout_s=120), "not started by torchrun"  # a lost rank fails, not hangs
    rank = D.rank()
    args.out.mkdir(parents=True, exist_ok=True)
    for strategy in args.strategies.split(","):
        stem = args.out / f"{args.runner}_{strategy}_rank{rank}"
        t0 = time.perf_counter()
        try:
            if args.runner == "loop":
                res = run_loop(strategy, args.steps, grad_ckpt=args.grad_ckpt)
            else:
                res = run_trainer(strategy, args.steps, args.out, world=D.world_size(), save=args.save)
            model = res.pop("model")
            identical = D.adapters_identical(model)
            state = D.trainable_state(model)
            digest = base_digest(D.unwrap_model(model))
        except Exception:
            # the test shows this; the non-zero exit makes torchrun stop the other rank
            Path(str(stem) + ".json").write_text(json.dumps({"error": traceback.format_exc(), "rank": rank}))
            raise
        save_file({k: v.contiguous() for k, v in state.items()}, str(stem) + ".safetensors")
        res.update(rank=rank, world=D.world_size(), strategy=strategy, identical=identical, base_digest=digest,
                   seconds=time.perf_counter() - t0)
        Path(str(stem) + ".json").write_text(json.dumps(res))
        D.barrier()
    D.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
