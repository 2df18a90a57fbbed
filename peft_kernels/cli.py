"""``peft-kernels``: the command line. ``main(argv)`` returns the exit code (0 ok, 2 bad input, 130 Ctrl-C).

    peft-kernels train    --config run.yaml | --model PATH --data FILE --method lora --max-steps 200 ...
    peft-kernels demo     [--model PATH --data FILE]          # what `make demo` runs
    peft-kernels estimate --model PATH | --config config.json | --shape llama-3-8b --method lora --quantize [--all-switches]
    peft-kernels merge    --model PATH --adapter DIR --out DIR [--mode dequantize|requantize]
    peft-kernels convert  checkpoint SRC OUT [--dequantize]   # transformers/bitsandbytes 4-bit <-> ours, dense -> 4-bit
    peft-kernels convert  adapter SRC OUT --model BASE [--to ours|peft]
    peft-kernels bench    [--gpu | --methods] [-- extra args]

Expected failures (a path that is not a model, malformed data, unknown config keys, a checkpoint of
another run, a full disk) print one line ``peft-kernels <command>: error: ...`` and exit with 2;
``PEFT_KERNELS_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from . import demo as _demo

REPO = Path(__file__).resolve().parents[1]

# ===================================================================== train: the run config
#: Keys of a run config besides TrainConfig's fields (which may sit at the top level or under "train").
RUN_KEYS = {
    "model": "local transformers causal LM directory (required)",
    "tokenizer": "tokenizer directory (default: the model's)",
    "data": "training data file: .jsonl/.json/.txt/.parquet/... or a datasets directory (required)",
    "eval_data": "held-out data file for the eval loop",
    "method": "method name, {name: lora, r: 16, ...}, a list of those, or 'full' (default lora)",
    "quantize": "true, false, or a dict of quantize_model settings (default false)",
    "gradient_checkpointing": "recompute decoder layers in backward (default false)",
    "offload_activations": "with gradient_checkpointing: checkpoints in pinned CPU memory (CUDA; default false)",
    "fused_kernels": "fused RMSNorm / SwiGLU MLP modules and RoPE kernels (default false)",
    "responses_only": "loss on the responses / assistant turns only (default true)",
    "resume_from": "checkpoint directory, or 'latest' (the newest in output_dir)",
    "device": "cpu, cuda or auto (default auto)",
    "dtype": "dtype the base model is loaded in: fp32, bf16 or fp16 (default fp32)",
    "train": "a section of TrainConfig fields (they may also sit at the top level)",
}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConfigError(ValueError):
    """A run config (file or flags) with unknown keys or impossible values; the message names them."""


def _train_fields() -> list[str]:
    from .train.trainer import TrainConfig

    return TrainConfig.fields()


def read_config_file(path: str | os.PathLike) -> dict:
    """A run config from YAML (.yaml/.yml) or JSON (.json); ConfigError naming the file (and line) if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    else:
        raise ConfigError(f"{p}: unknown config file type {p.suffix!r} (use .yaml, .yml or .json)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a run config must be a mapping of settings, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it (numbers, true/false, null, lists), else the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict, sets: list[str]) -> dict:
    """``--set key=value`` / ``--set method.r=16`` / ``--set train.lr=1e-4`` applied to a copy of ``cfg``."""
    cfg = json.loads(json.dumps(cfg))  # deep copy of plain data
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            cur = node.get(part)
            if part == "method" and i == 0 and isinstance(cur, str):
                cur = {"name": cur}  # "method: lora" + "--set method.r=8" -> {name: lora, r: 8}
            elif cur is None:
                cur = {"name": "lora"} if part == "method" and i == 0 else {}
            elif not isinstance(cur, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is {cur!r}, not a section")
            node[part] = cur
            node = cur
        node[parts[-1]] = _parse_value(value)
    return cfg


def normalize_run_config(raw: dict) -> tuple[dict, dict]:
    """Split a run config into (run settings, TrainConfig dict), refusing unknown or duplicated keys."""
    fields = _train_fields()
    run, train = {}, {}
    section = raw.get("train", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"'train' must be a mapping of TrainConfig fields, got {type(section).__name__}")
    unknown = sorted(k for k in raw if k not in RUN_KEYS and k not in fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(RUN_KEYS)} and the TrainConfig "
                          f"fields {fields}")
    bad_section = sorted(k for k in section if k not in fields)
    if bad_section:
        raise ConfigError(f"unknown key(s) {bad_section} in the 'train' section; valid: {fields}")
    for k, v in raw.items():
        if k == "train":
            continue
        (train if k in fields else run)[k] = v
    both = sorted(set(train) & set(section))
    if both:
        raise ConfigError(f"{both} given both at the top level and in the 'train' section")
    train.update(section)
    for req in ("model", "data"):
        if not run.get(req):
            raise ConfigError(f"the run config needs '{req}' ({RUN_KEYS[req]})")
    if "dtype" in run and run["dtype"] not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {run['dtype']!r}")
    if "device" in run and run["device"] not in ("cpu", "cuda", "auto") and not str(run["device"]).startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {run['device']!r}")
    for k in ("gradient_checkpointing", "offload_activations", "responses_only", "fused_kernels"):
        if k in run and not isinstance(run[k], bool):
            raise ConfigError(f"{k} must be true or false, got {run[k]!r}")
    if "quantize" in run and not isinstance(run["quantize"], (bool, dict)):
        raise ConfigError(f"quantize must be true, false or a mapping of quantize_model settings, got "
                          f"{run['quantize']!r}")
    for req in ("output_dir", "max_steps"):
        if req not in train:
            raise ConfigError(f"the run config needs '{req}' (a TrainConfig field)")
    return run, train


def method_configs(spec) -> Optional[list]:
    """Method config objects from a run config's ``method`` entry (None: full fine-tuning)."""
    from .methods.registry import config_from_dict

    if spec is None:
        spec = "lora"
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for item in items:
        if isinstance(item, str):
            if item.strip().lower() in ("full", "none"):
                if len(items) > 1:
                    raise ConfigError("method 'full' cannot be combined with other methods")
                return None
            try:
                out.append(config_from_dict(item, {}))
            except ValueError as e:
                raise ConfigError(f"{e} (give settings with --set method.KEY=VALUE, or a 'method:' section with "
                                  f"name: {item})") from None
        elif isinstance(item, dict):
            d = dict(item)
            name = d.pop("name", None) or d.pop("method", None)
            if not isinstance(name, str):
                raise ConfigError(f"a method section needs 'name' (e.g. name: lora), got keys {sorted(item)}")
            out.append(config_from_dict(name, d))
        else:
            raise ConfigError(f"method must be a name, a mapping with 'name', or a list of those; got {item!r}")
    return out


def _device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def run_train(raw: dict) -> int:
    """Load model + data, prepare, train, save the adapter; prints a summary. ``raw``: the merged run config."""
    import torch

    from .train.trainer import TrainConfig

    run, train = normalize_run_config(raw)
    tcfg = TrainConfig.from_dict(train)
    cfgs = method_configs(run.get("method"))  # config errors before any loading
    if cfgs is None and run.get("quantize"):
        raise ConfigError("quantize needs a PEFT method: full fine-tuning cannot train frozen 4-bit weights "
                          "(use method: lora for QLoRA, or quantize: false)")
    dtype = getattr(torch, _DTYPES[run.get("dtype", "fp32")])
    from .train import distributed as D

    # Under torchrun / accelerate launch: one process per device, the Trainer wraps the model (DDP or FSDP2
    # per `distributed`); only rank 0 prints and writes files. A plain run: a no-op.
    created = not D.is_initialized() and D.init_from_env()
    try:
        auto = run.get("device") in (None, "auto")
        device = D.device() if D.is_initialized() and auto else _device(run.get("device"))
        return _train(run, tcfg, cfgs, dtype, device, D.is_main())
    finally:
        if created:  # a group the caller set up stays theirs
            D.destroy()


def _train(run: dict, tcfg, cfgs, dtype, device, main: bool) -> int:
    import torch

    from .methods.registry import save_adapters
    from .prepare import prepare
    from .train import distributed as D
    from .train.data import load_records, tokenize_records
    from .train.trainer import Trainer

    model, tokenizer = _demo.load_causal_lm(run["model"], dtype=dtype, tokenizer_path=run.get("tokenizer"))
    responses_only = run.get("responses_only", True)
    train_ex = tokenize_records(load_records(run["data"]), tokenizer, tcfg.seq_len, responses_only=responses_only)
    eval_ex = (tokenize_records(load_records(run["eval_data"]), tokenizer, tcfg.seq_len,
                                responses_only=responses_only) if run.get("eval_data") else None)
    model.to(device)
    torch.manual_seed(tcfg.seed)  # the adapters' initialisation: the same run every time
    model, report = prepare(model, cfgs, quantize=run.get("quantize", False),
                            gradient_checkpointing=run.get("gradient_checkpointing", False),
                            offload_activations=run.get("offload_activations", False), seq_len=tcfg.seq_len,
                            batch_size=tcfg.batch_size, precision=tcfg.precision, optimizer=tcfg.optimizer,
                            fused_kernels=run.get("fused_kernels", False),
                            fused_cross_entropy=tcfg.fused_cross_entropy)
    out = Path(tcfg.output_dir)
    if main:
        print(report)
        out.mkdir(parents=True, exist_ok=True)
        # What merge/convert need to rebuild the same base (the adapter files do not say it was 4-bit).
        (out / "run_config.json").write_text(json.dumps({**run, "train": tcfg.to_dict()}, indent=2, default=str)
                                             + "\n")
    trainer = Trainer(model, tokenizer, tcfg, train_ex, eval_ex)
    try:
        result = trainer.train(resume_from=run.get("resume_from"))
    except KeyboardInterrupt:
        if main:
            print(f"interrupted: the last completed step is saved under {out} (resume with --resume latest)",
                  file=sys.stderr)
        return 130
    eval_loss = trainer.evaluate() if eval_ex else None  # a collective under DDP/FSDP2: every rank
    adapter_dir = out / ("adapter" if cfgs else "model")
    with D.gathered_params(trainer.train_model):  # FSDP2: whole tensors while rank 0 writes (every rank enters)
        if main:
            if cfgs:
                save_adapters(model, adapter_dir)
            else:  # full fine-tuning: the whole model (atomically, with its tokenizer)
                save_model(model, tokenizer, adapter_dir, overwrite=True)
    D.barrier()
    if main:
        first, last = result.losses[0], result.losses[-1]
        ranks = f" on {D.world_size()} processes" if D.world_size() > 1 else ""
        print(f"trained {result.steps} steps{ranks}: loss {first:.4f} -> {last:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s")
        if eval_loss is not None:
            print(f"eval loss {eval_loss:.4f}")
        print(f"saved {'adapter' if cfgs else 'model'} to {adapter_dir}")
    return 0


def _train_from_args(args) -> int:
    raw = read_config_file(args.config) if args.config else {}
    flags = {"model": args.model, "tokenizer": args.tokenizer, "data": args.data, "eval_data": args.eval_data,
             "method": args.method, "quantize": args.quantize, "gradient_checkpointing": args.gradient_checkpointing,
             "offload_activations": args.offload_activations, "resume_from": args.resume, "device": args.device,
             "dtype": args.dtype, "fused_kernels": args.fused_kernels}
    tflags = {"output_dir": args.output_dir, "max_steps": args.max_steps, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "lr": args.lr, "seq_len": args.seq_len, "precision": args.precision,
              "optimizer": args.optimizer, "scheduler": args.scheduler, "warmup_steps": args.warmup_steps,
              "save_every": args.save_every, "eval_every": args.eval_every, "packing": args.packing,
              "seed": args.seed, "fused_cross_entropy": args.fused_cross_entropy}
    if args.no_progress:
        tflags["progress"] = False
    for k, v in flags.items():
        if v is not None:
            raw[k] = v
    section = raw.get("train") if isinstance(raw.get("train"), dict) else None
    for k, v in tflags.items():
        if v is not None:
            (section if section is not None and k in section else raw)[k] = v
    raw = apply_overrides(raw, args.set or [])
    return run_train(raw)


# ===================================================================== estimate
def _load_config_dict(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no model config there (expected a config.json or a model directory)")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not a JSON model config ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a model config must be a JSON object")
    return d


def model_config(path: str | os.PathLike):
    """A transformers config object from config.json (no weights read); the plain dict for unknown model types."""
    d = _load_config_dict(path)
    model_type = d.get("model_type")
    if not model_type:
        raise ConfigError(f"{path}: config has no model_type (not a transformers model config)")
    from transformers import AutoConfig

    try:
        kwargs = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version", "architectures")}
        return AutoConfig.for_model(model_type, **kwargs)
    except ValueError:
        return d


def _estimate(args) -> int:
    from .train.estimate import estimate_memory

    if args.shape:
        from .train.estimate import llama_config
        src, cfg = args.shape, llama_config(args.shape)
    else:
        src = args.model or args.config
        cfg = model_config(src)
    method: Any = args.method
    if args.method.strip().lower() in ("full", "none"):
        method = "full"
    est = estimate_memory(cfg, method=method, seq_len=args.seq_len, batch_size=args.batch, quantize=args.quantize,
                          precision=args.precision, gradient_checkpointing=args.gradient_checkpointing,
                          optimizer=args.optimizer, lora_r=args.r, fused_cross_entropy=args.fused_cross_entropy,
                          quantize_embeddings=args.quantize_embeddings or args.all_switches,
                          quantize_head=args.quantize_head or args.all_switches,
                          offload_activations=args.offload_activations or args.all_switches,
                          optimizer_in_backward=args.optimizer_in_backward or args.all_switches,
                          fused_kernels=args.fused_kernels or args.all_switches)
    if args.json:
        print(json.dumps({"total_bytes": int(est.total_bytes), "breakdown": {k: int(v) for k, v in
                                                                              est.breakdown.items()}}, indent=2))
        return 0
    print(f"{src}: {args.method}{' over a 4-bit base' if args.quantize else ''}, seq {args.seq_len}, batch "
          f"{args.batch}, {args.precision}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.optimizer}")
    print(est)
    if est.breakdown and "\n" not in str(est):
        width = max(len(k) for k in est.breakdown)
        for k, v in est.breakdown.items():
            print(f"  {k:<{width}}  {v / 2**20:12,.1f} MiB")
    return 0


# ===================================================================== merge / convert helpers
def _is_4bit_checkpoint(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    q = cfg.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit", True))


def load_base(path: str | os.PathLike, *, dtype_name: Optional[str] = None, quantize: bool = False):
    """(model, tokenizer or None): a 4-bit transformers/bitsandbytes checkpoint through our streaming loader,
    a dense one through transformers (then quantized in place with ``quantize``, as ``prepare`` does)."""
    import torch

    p = _demo.check_model_dir(path)
    dtype = getattr(torch, _DTYPES[dtype_name]) if dtype_name else None
    if _is_4bit_checkpoint(p):
        from .quant.checkpoint import load_quantized

        model = load_quantized(p, dtype=dtype)
        tokenizer = _try_tokenizer(p)
    else:
        model, tokenizer = _demo.load_causal_lm(p, dtype=dtype or "auto")  # "auto": the checkpoint's dtype
        if quantize:
            from .quant.model import quantize_model

            quantize_model(model)
    return model, tokenizer


def _try_tokenizer(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a checkpoint without tokenizer files is fine here
        return None


def dequantize_model(model, dtype=None) -> int:
    """Replace every Linear4bit by an nn.Linear holding dequant(W) (in ``dtype``, default the layer's
    original dtype) and drop the config's quantization_config; returns how many layers changed."""
    from torch import nn

    from .nn.linear4bit import Linear4bit

    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        layer = model.get_submodule(name)
        dt = dtype or layer.weight_dtype
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        dense.weight = nn.Parameter(layer.dequantize(dt).detach().clone(), requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(dt).clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("is_quantized", "hf_quantizer", "quantization_method"):
        if attr in getattr(model, "__dict__", {}):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    return len(names)


def _has_4bit(model) -> bool:
    from .nn.linear4bit import Linear4bit

    return any(isinstance(m, Linear4bit) for m in model.modules())


def save_model(model, tokenizer, out: str | os.PathLike, *, overwrite: bool = False) -> str:
    """4-bit models as a transformers/bitsandbytes checkpoint (save_quantized), dense ones with save_pretrained
    (safetensors); the tokenizer beside it. Atomic: everything is written to a staging directory that
    then takes ``out``'s place, so a failure (a full disk) leaves no half-written model. Returns a word
    for what was written."""
    from .io.atomic import replace_directory

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    with replace_directory(out, owned=lambda name: True) as staging:
        if _has_4bit(model):
            from .quant.checkpoint import save_quantized

            save_quantized(model, staging, overwrite=True)
            kind = "4-bit checkpoint"
        else:
            model.save_pretrained(staging)
            kind = "dense checkpoint"
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return kind


def _run_config_quantize(adapter: Path) -> Optional[bool]:
    """``quantize`` from the run_config.json ``peft-kernels train`` writes next to ``adapter`` (None if absent)."""
    p = adapter.parent / "run_config.json"
    try:
        q = json.loads(p.read_text()).get("quantize")
    except (OSError, ValueError, AttributeError):
        return None
    return bool(q) if q is not None else None


def _merge(args) -> int:
    import torch

    from .methods import bitfit, ia3, lora, sparse
    from .methods.registry import applied_methods, inner_model, load_adapters

    adapter = Path(args.adapter)
    quantize = args.quantize
    if quantize is None:
        quantize = bool(_run_config_quantize(adapter))
        if quantize:
            print(f"{adapter.parent / 'run_config.json'}: the adapter was trained on a 4-bit base; quantizing the "
                  f"base the same way (--no-quantize to merge into the dense weights)")
    model, tokenizer = load_base(args.model, dtype_name=args.dtype, quantize=quantize)
    model = load_adapters(model, adapter)
    methods = applied_methods(model)
    unmergeable = [m for m in methods if m not in ("lora", "ia3", "sparse", "bitfit")]
    if unmergeable:
        raise ConfigError(f"{adapter}: method(s) {unmergeable} add modules or inputs and cannot be merged into the "
                          f"weights; load them with peft_kernels.methods.registry.load_adapters instead")
    base = inner_model(model)
    four_bit = _has_4bit(base)
    mode = args.mode if four_bit else "exact"
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    for m in methods:
        if m == "lora":
            lora.merge_and_unload(base, mode=mode, dtype=dtype)
        elif m == "ia3":
            ia3.merge_and_unload(base, mode=mode, dtype=dtype)
        elif m == "sparse":
            sparse.merge_and_unload(base, mode=mode, dtype=dtype)
        else:
            bitfit.merge_and_unload(base)
    if four_bit and args.mode == "dequantize":
        dequantize_model(base, dtype)
    kind = save_model(base, tokenizer, args.out, overwrite=args.overwrite)
    print(f"merged {', '.join(methods)} ({mode if four_bit else 'exact, dense base'}) into {args.model}: "
          f"{kind} in {args.out}")
    return 0


def _convert(args) -> int:
    if args.kind == "checkpoint":
        return _convert_checkpoint(args)
    return _convert_adapter(args)


def _convert_checkpoint(args) -> int:
    """4-bit (transformers/bitsandbytes) -> ours re-saved, or dequantized; dense -> 4-bit (streamed)."""
    import torch

    from .quant.checkpoint import load_quantized

    src = _demo.check_model_dir(args.src)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    was_4bit = _is_4bit_checkpoint(src)
    quant = {} if was_4bit else {"quant_type": args.quant_type, "blocksize": args.blocksize,
                                 "double_quant": not args.no_double_quant}
    model = load_quantized(src, dtype=dtype, **quant)
    tokenizer = _try_tokenizer(src)
    if args.dequantize:
        n = dequantize_model(model, dtype)
        what = f"dequantized {n} 4-bit layers"
    else:
        what = "re-saved the 4-bit checkpoint" if was_4bit else "quantized the dense checkpoint to 4-bit"
    kind = save_model(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"{src}: {what}; {kind} in {args.out}")
    return 0


def _convert_adapter(args) -> int:
    from .methods.registry import applied_methods, load_adapters, save_adapters

    src = Path(args.src)
    if args.to == "peft":
        return _adapter_to_peft(args, src)
    model, _ = load_base(args.model, quantize=args.quantize)
    model = load_adapters(model, src, is_trainable=False)
    out = save_adapters(model, args.out)
    print(f"{src}: {', '.join(applied_methods(model))} adapter checked against {args.model} and written in "
          f"peft_kernels' format to {out}")
    return 0


def _adapter_to_peft(args, src: Path) -> int:
    """Write ``src`` through the PEFT library itself (PeftModel.save_pretrained): LoRA, IA3, prompt/prefix tuning."""
    import peft

    from .methods.registry import PEFT_TYPES, _peft_type_of

    method = _peft_type_of(src) if (src / "adapter_config.json").exists() else None
    if method not in ("lora", "ia3", "prompt_tuning", "prefix_tuning"):
        names = [k for k, v in PEFT_TYPES.items() if v in ("lora", "ia3", "prompt_tuning", "prefix_tuning")]
        raise ConfigError(f"{src}: only single-method adapters of a type PEFT has ({', '.join(names)}) can be written "
                          f"by PEFT; this one is {method or 'not a single adapter directory'}")
    model, _ = _demo.load_causal_lm(args.model)
    try:
        pm = peft.PeftModel.from_pretrained(model, str(src))
    except Exception as e:
        raise ConfigError(f"{src}: PEFT could not load it onto {args.model}: {type(e).__name__}: {e}") from None
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    from .io.atomic import replace_directory

    with replace_directory(out, owned=lambda name: True) as staging:  # never a half-written adapter
        pm.save_pretrained(str(staging))
    print(f"{src}: {method} adapter loaded by PEFT {peft.__version__} onto {args.model} and saved by it to {out}")
    return 0


# ===================================================================== bench
def bench_command(args) -> list[str]:
    """The command ``peft-kernels bench`` runs (a list for subprocess)."""
    extra = list(args.extra or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.gpu:
        return [sys.executable, str(REPO / "bench" / "gpu_suite.py"), *extra]
    if args.methods:
        return [sys.executable, str(REPO / "bench" / "compare_methods.py"), *extra]
    cmd = [sys.executable, "-m", "pytest", str(REPO / "bench"), "-q"]
    if args.time:
        cmd += ["--benchmark-only", "--benchmark-columns=min,median,mean,rounds"]
    return cmd + extra


def _bench(args) -> int:
    if not (REPO / "bench").is_dir():
        raise ConfigError(f"no bench/ folder next to the package ({REPO}): the benchmarks ship with the source "
                          f"checkout, not the installed wheel")
    cmd = bench_command(args)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.call(cmd, cwd=str(REPO), env=env)


# ===================================================================== parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-kernels", description="Kernel-accelerated PEFT over 4-bit bases.")
    sub = p.add_subparsers(dest="command", metavar="{train,demo,estimate,merge,convert,bench}")
    sub.required = True

    t = sub.add_parser("train", help="fine-tune a local model on a data file (YAML/JSON config or flags)",
                       description="Fine-tune a local transformers causal LM. Flags override the config file; "
                                   "--set KEY=VALUE sets anything (method.r=16, train.lr=1e-4).")
    t.add_argument("--config", help="run config (.yaml/.yml/.json)")
    t.add_argument("--model")
    t.add_argument("--tokenizer")
    t.add_argument("--data")
    t.add_argument("--eval-data")
    t.add_argument("--method", help="method name (lora, dora, bitfit, sparse, adapter, ia3, freeze, prompt_tuning, "
                                    "prefix_tuning) or 'full'")
    t.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=None, help="4-bit NF4 base (QLoRA)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="with --gradient-checkpointing: keep checkpoints in pinned CPU memory (CUDA)")
    t.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="fused RMSNorm / SwiGLU / RoPE kernels (docs/training/fused_kernels.md)")
    t.add_argument("--output-dir")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--optimizer")
    t.add_argument("--scheduler")
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--fused-cross-entropy", action=argparse.BooleanOptionalAction, default=None,
                   help="loss from the hidden states and the head in chunks, no [B, T, V] logits (default on)")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", help="checkpoint directory or 'latest'")
    t.add_argument("--device")
    t.add_argument("--dtype", choices=list(_DTYPES))
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any config key (repeatable)")

    d = sub.add_parser("demo", help="fine-tune the shipped demo model on the shipped data (what `make demo` runs)",
                       description=_demo.__doc__.splitlines()[0])
    _demo.add_arguments(d)

    e = sub.add_parser("estimate", help="peak training memory from a model config, before loading any weights")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (its config.json is read, never the weights)")
    src.add_argument("--config", help="a config.json")
    src.add_argument("--shape", choices=["llama-3-8b", "llama-3-70b"], help="a well-known shape (no file needed)")
    e.add_argument("--method", default="lora", help="lora, dora, bitfit, ..., or full (default lora)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--quantize", action="store_true", help="4-bit NF4 base (QLoRA)")
    e.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--optimizer", default="adamw")
    e.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    e.add_argument("--fused-cross-entropy", action=argparse.BooleanOptionalAction, default=True,
                   help="the Trainer's fused loss, no [T, V] logits (default on; --no-fused-cross-entropy: "
                        "transformers' full-logits loss)")
    e.add_argument("--quantize-embeddings", action="store_true", help="4-bit input embeddings")
    e.add_argument("--quantize-head", action="store_true", help="4-bit output head")
    e.add_argument("--offload-activations", action="store_true",
                   help="checkpoints in pinned host memory (with --gradient-checkpointing)")
    e.add_argument("--fused-kernels", action="store_true", help="fused RMSNorm and SwiGLU modules")
    e.add_argument("--optimizer-in-backward", action="store_true",
                   help="TrainConfig.optimizer_in_backward: each parameter updated inside backward")
    e.add_argument("--all-switches", action="store_true",
                   help="--quantize-embeddings --quantize-head --fused-kernels --offload-activations "
                        "--optimizer-in-backward (with the fused loss)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")

    m = sub.add_parser("merge", help="merge an adapter into its base model and save the result")
    m.add_argument("--model", required=True, help="the base model directory (dense or a 4-bit checkpoint)")
    m.add_argument("--adapter", required=True, help="adapter directory (ours or PEFT's)")
    m.add_argument("--out", required=True)
    m.add_argument("--mode", choices=["dequantize", "requantize"], default="dequantize",
                   help="over a 4-bit base: write dense dequant(W4)+delta (default), or requantize to 4-bit")
    m.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize a dense base first, as training did (default: what run_config.json next to the "
                        "adapter says, else no)")
    m.add_argument("--dtype", choices=list(_DTYPES), help="dtype of the dense result (default: the model's)")
    m.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="bitsandbytes/PEFT files to and from ours")
    csub = c.add_subparsers(dest="kind", metavar="{checkpoint,adapter}")
    csub.required = True
    cc = csub.add_parser("checkpoint", help="a transformers/bitsandbytes 4-bit checkpoint -> ours (validated, "
                                            "re-sharded) or dense (--dequantize); a dense checkpoint -> 4-bit")
    cc.add_argument("src")
    cc.add_argument("out")
    cc.add_argument("--dequantize", action="store_true", help="write dense weights (for tools without bitsandbytes)")
    cc.add_argument("--dtype", choices=list(_DTYPES))
    cc.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    cc.add_argument("--blocksize", type=int, default=64)
    cc.add_argument("--no-double-quant", action="store_true")
    cc.add_argument("--overwrite", action="store_true")
    ca = csub.add_parser("adapter", help="a PEFT adapter -> ours (checked against the base), or ours -> written by "
                                         "the PEFT library (--to peft)")
    ca.add_argument("src")
    ca.add_argument("out")
    ca.add_argument("--model", required=True, help="the base model the adapter belongs to")
    ca.add_argument("--to", choices=["ours", "peft"], default="ours")
    ca.add_argument("--quantize", action="store_true", help="load the base in 4-bit (for a QLoRA adapter)")
    ca.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("bench", help="run the CPU benchmarks (pytest bench), the GPU suite (--gpu) or the method "
                                     "comparison (--methods)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--gpu", action="store_true", help="bench/gpu_suite.py (needs CUDA, or pass -- --dry-run)")
    which.add_argument("--methods", action="store_true", help="bench/compare_methods.py")
    b.add_argument("--time", action="store_true", help="pytest bench: time (--benchmark-only) instead of one check run")
    b.add_argument("--print-command", action="store_true", help="print the command instead of running it")
    b.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed on (after --)")
    return p


_HANDLERS = {"train": _train_from_args, "demo": _demo.run, "estimate": _estimate, "merge": _merge,
             "convert": _convert, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    from .train.data import DataError

    try:
        return _HANDLERS[args.command](args)
    except (ValueError, OSError, DataError) as e:
        if os.environ.get("PEFT_KERNELS_DEBUG"):
            raise
        print(f"peft-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peft-kernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
