"""Peak training memory from a model config alone: ``estimate_memory(config, method=..., seq_len=...)``.

Nothing is loaded or allocated: the estimate adds up the tensors one training step of a transformers
Llama-style decoder (Llama, Mistral, Qwen2...: RMSNorm, rotary attention, SwiGLU MLP) holds, phase by
phase, and reports the largest phase. One formula for every case; each term below was checked against
measured CPU steps (tests/test_estimate.py). Notation: T = batch · positions per row, h = hidden,
I = intermediate, V = vocabulary, nh/kvh/d = heads/key-value heads/head size; a = bytes per element of
the dense weights and the residual stream (the dtype the model was loaded in), A = bytes per element of
the compute (linear outputs, attention) — A < a only under autocast (fp32 weights, 16-bit compute).

Persistent (every phase)
  ``weights``          dense tensors in ``a`` bytes; each 4-bit linear as ``Linear4bit`` holds it: N·K/2
                       packed bytes, one absmax per block (uint8 with double quantization, plus an fp32
                       absmax per 256 blocks and the 256-entry map; fp32 without), the 16-entry code book;
                       rotary inv_freq buffers; a sparse method's int64 indices
  ``trainable``        the method's parameters: adapters fp32, fully trained weights in ``a`` bytes
  ``optimizer_state``  AdamW: two moments in each parameter's dtype; 8-bit AdamW: 2 bytes + block stats
  ``dequant_workspace`` (CUDA, 4-bit) the cached buffer the largest 4-bit linear is dequantized into for
                       long inputs (kernels/matmul4bit.py), A bytes per weight
Saved activations, per block that gradients pass through (from the lowest trained piece up; every
block with transformers' checkpointing, which makes the embedding output require grad)
  RMSNorm: its input as fp32 (T·h·4: a copy, or the residual itself when it is fp32) + rsqrt (T·4);
  its output when the norm weight trains. Attention (when any input requires grad): q, k, v and, for
  SDPA, its output (= o_proj's input) in A bytes + log-sum-exp (b·nh·s·4); k/v repeated to nh heads
  for eager attention or with an attention mask (prefix tuning); eager also keeps the fp32 softmax
  probabilities (b·nh·s·s_kv·4, + a 16-bit copy). SwiGLU: gate out, SiLU out, up out (3·T·I).
  Linears: a trained dense weight, LoRA and sparse deltas keep the layer input — once for q/k/v and
  once for gate/up, or under autocast a cast copy per layer; LoRA also x·Aᵀ (T·r·A) and dropout masks
  (T·K bytes); ``Linear4bit`` and BitFit keep nothing of x; a plain dense linear under autocast keeps
  its weight's 16-bit copy (the frozen lm_head too: V·h·A). IA3 keeps the scaled tensor, a bottleneck
  adapter its input and [T, r] pre-activation. Under autocast a 4-bit layer (and LoRA over it) outputs
  its input's dtype (fp32), every other linear A bytes. With gradient checkpointing only each block's
  input (T·h·a) is kept and one block is recomputed during its backward.
Loss (transformers' ``ForCausalLMLoss`` and the Trainer's ``causal_lm_loss_sum`` alike)
  forward: logits (T·V·A), their fp32 copy, the log-softmax (T·V·4); backward: the saved log-softmax,
  the NLL gradient and the logits gradient, all fp32 (3·T·V·4). The caller is assumed to drop the
  model output before backward (``loss = model(**batch).loss``, as transformers' Trainer does).
Fused linear cross-entropy (``fused_cross_entropy=True``, the Trainer's default; ``ops/fused_ce.py``)
  replaces the loss terms: the n = B·(s-1) rows with a label are copied out of the final hidden states
  (n·h·a), dH float32 [n, h] is filled chunk by chunk and saved, one logits chunk [T_c, V] (T_c = chunk //
  (V·A)) is reused, plus on CPU the plain-torch row work's two float32 chunk-sized temporaries, and for a
  4-bit head (or a dense head in another dtype than the compute) one vocabulary slice of W of <= chunk
  bytes and that slice's logits. Loss backward: dH scaled (n·h·4) and the hidden-state gradient (T·h·a).
4-bit embeddings / head (``quantize_embeddings`` / ``quantize_head``; one shared table when tied): each table
  is stored like a ``Linear4bit`` weight. A 4-bit head without the fused loss is dequantized whole for the
  logits (CUDA: into the cached workspace, which then has the head's size; CPU: a transient copy in the
  forward and again in its backward), and its logits are in its input's dtype.
Fused kernels (``fused_kernels``): a fused RMSNorm keeps its input itself (T·h·a, the residual) + rstd, not
  a float32 copy, and nothing more when its weight trains; a fused SwiGLU keeps gate and up only (SiLU is
  recomputed in its backward). On CPU the SwiGLU backward runs the plain-torch closed form over slices of
  ``ops.fused_layers.CPU_BACKWARD_CHUNK`` elements: 4 float32 temporaries per slice element (7 for 16-bit).
  The fused RoPE (``rope``) changes no term: it saves cos and sin, as transformers' expression does.
Optimizer step in backward (``optimizer_in_backward``): no ``optimizer_step`` phase; the backward phases hold
  one gradient (the largest) and one parameter's AdamW temporaries instead of every gradient.
Activation offload (``offload_activations=True`` with checkpointing, CUDA): the checkpoints live in pinned
  host memory; the device keeps at most 3 (the last layer's, the one in use, one prefetched).
Backward of a block (peak at the SwiGLU product's backward): its saved tensors minus the down_proj
  input (freed once down_proj's backward ran), plus d(product), d(SiLU out), d(up out) (3·T·I) and the
  block's output gradient (T·h·a); gradients accumulate for the blocks above it.
Optimizer step: one gradient per trainable parameter; AdamW's temporaries: CUDA's multi-tensor step one
  tensor the size of all trainable parameters, CPU's per-tensor step two the size of the largest.

Phases: ``forward`` (end of the loss forward), ``loss_backward``, ``backward_last_layer`` and
``backward_first_layer`` (the two ends of the block backward, where saved activations and accumulated
gradients trade places), ``optimizer_step``. ``MemoryEstimate.total_bytes`` is the largest, and
``breakdown`` that phase's terms (they sum to the total).

Not modelled: the CUDA context (outside ``max_memory_allocated``), cuBLAS workspaces (tens of MiB),
allocator rounding and fragmentation, a padding attention mask's effect on SDPA (packed,
padding-free batches are assumed), and the 4-bit kernels' transient scratch on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: PEFT's default LoRA targets for Llama-style models
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")
#: PEFT's default IA3 targets for Llama: (targets, feed-forward ones)
IA3_DEFAULT_TARGETS = (("k_proj", "v_proj", "down_proj"), ("down_proj",))
#: the config fields the estimator reads (others are ignored); a dict config may hold only known keys
CONFIG_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias",
                 "mlp_bias", "hidden_act", "max_position_embeddings", "attn_implementation", "_attn_implementation",
                 "torch_dtype", "dtype", "architectures", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "rope_parameters", "attention_dropout", "initializer_range", "use_cache", "pad_token_id",
                 "bos_token_id", "eos_token_id", "pretraining_tp", "transformers_version", "name_or_path",
                 "_name_or_path", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                 "bos_token", "eos_token", "quantization_config")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "granite", "phi3", None)
_CPU_QUANT_SETTINGS = ("quant_type", "blocksize", "double_quant")
GiB = 2 ** 30


# ================================================================== result
@dataclass
class MemoryEstimate:
    """Estimated peak bytes of one training step: ``total_bytes`` (the largest phase), ``breakdown``
    (that phase's terms, summing to the total), ``phases`` (every phase's total) and the inputs."""

    total_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    peak_phase: str = ""
    trainable_params: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def __str__(self) -> str:
        s = self.settings
        t = self.total_bytes
        size = f"{t / GiB:.2f} GiB ({t / 1e9:.2f} GB)" if t >= GiB else f"{t / 2**20:.2f} MiB"
        head = f"estimated peak memory: {size} in {self.peak_phase}"
        if s:
            head += (f" [{s.get('method')}, seq {s.get('seq_len')}, batch {s.get('batch_size')}, "
                     f"{s.get('precision')}{', 4-bit' if s.get('quantize') else ''}"
                     f"{', checkpointing' if s.get('gradient_checkpointing') else ''}, {s.get('optimizer')}, "
                     f"{s.get('device')}]")
        width = max([len(k) for k in self.breakdown] + [8])
        rows = [head] + [f"  {k:<{width}} {v / 2**20:>12,.2f} MiB" for k, v in self.breakdown.items() if v]
        return "\n".join(rows)


# ================================================================== model shape
@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder the estimate needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attn_implementation: str = "sdpa"
    model_type: Optional[str] = "llama"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear of one block."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def linear_has_bias(self, name: str) -> bool:
        return self.mlp_bias if name in ("gate_proj", "up_proj", "down_proj") else self.attention_bias


@functools.lru_cache(maxsize=1)
def known_config_keys() -> frozenset:
    """Keys a Llama-style ``config.json`` may hold: the estimator's own fields plus every field of
    transformers' ``PretrainedConfig`` and its Llama, Mistral and Qwen2 configs."""
    import transformers as tf

    keys = set(CONFIG_FIELDS)
    for cls in (tf.PretrainedConfig, tf.LlamaConfig, tf.MistralConfig, tf.Qwen2Config):
        keys |= set(cls().to_dict())
    return frozenset(keys)


def _positive_int(d: dict, key: str, problems: list, default=None):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        problems.append(f"{key}={v!r} (must be a positive integer)")
        return 1
    return v


def model_shape(config) -> ModelShape:
    """A :class:`ModelShape` from a transformers config or a config dict (``config.json`` contents).

    Raises ValueError naming every problem: unknown keys (dict configs), missing/non-positive sizes,
    heads that do not divide, an unsupported model type or attention implementation."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, dict):
        d = dict(config)
        unknown = sorted(k for k in d if k not in known_config_keys())
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}: not fields of a transformers Llama/Mistral/"
                             f"Qwen2 config (misspelled?); the estimator reads {list(CONFIG_FIELDS[:9])}")
    elif hasattr(config, "to_dict") and hasattr(config, "hidden_size"):
        d = config.to_dict()
        d["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    else:
        raise ValueError(f"model config must be a transformers PretrainedConfig or a dict, got "
                         f"{type(config).__name__}")
    problems: list[str] = []
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={mt!r} (the estimator models Llama-style decoders: "
                        f"{[m for m in SUPPORTED_MODEL_TYPES if m]})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in d:
            problems.append(f"{key} is missing")
    h = _positive_int(d, "hidden_size", problems)
    inter = _positive_int(d, "intermediate_size", problems)
    layers = _positive_int(d, "num_hidden_layers", problems)
    heads = _positive_int(d, "num_attention_heads", problems)
    kv = d.get("num_key_value_heads")
    kv = heads if kv is None else kv
    kv = _positive_int({"num_key_value_heads": kv}, "num_key_value_heads", problems)
    vocab = _positive_int(d, "vocab_size", problems)
    hd = d.get("head_dim")
    if hd is None:
        if h % heads:
            problems.append(f"hidden_size={h} is not divisible by num_attention_heads={heads}")
        hd = max(h // heads, 1)
    else:
        hd = _positive_int({"head_dim": hd}, "head_dim", problems)
    if heads % kv:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    attn = d.get("_attn_implementation") or d.get("attn_implementation") or "sdpa"
    if attn not in ATTENTION:
        problems.append(f"attn_implementation={attn!r} (modelled: {list(ATTENTION)})")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems))
    return ModelShape(hidden=h, intermediate=inter, layers=layers, heads=heads, kv_heads=kv, head_dim=hd,
                      vocab=vocab, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                      attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                      attn_implementation=attn, model_type=mt)


# ================================================================== what a method does to the model
@dataclass
class LinearPlan:
    """One linear of one block under the method(s)."""

    quantized: bool = False          # the frozen base is Linear4bit
    weight_trains: bool = False      # the dense weight itself trains (full fine-tuning, freeze)
    saves_input: bool = False        # its input x is kept for backward
    extra_saved_per_token: float = 0.0   # other saved bytes per token (LoRA x·Aᵀ, masks...)
    trainable: list[int] = field(default_factory=list)  # element counts of its trainable tensors (fp32)
    persistent_bytes: int = 0        # extra non-trainable bytes (sparse indices)
    lora_r: int = 0


@dataclass
class Plan:
    """The whole model under the method(s): per layer and linear, plus what trains outside the blocks."""

    linears: list[dict[str, LinearPlan]]
    embed_trains: bool = False
    head_trains: bool = False
    norms_train: bool = False             # every RMSNorm weight trains
    layer_trains: list[bool] = field(default_factory=list)   # a block's dense params all train (freeze)
    extra_trainable: list[int] = field(default_factory=list)  # prompt/prefix/adapter tensors (fp32 elems)
    extra_persistent: int = 0             # other non-trainable bytes the method adds
    adapter_points: dict = field(default_factory=dict)    # block -> ("attn", "ffn") bottleneck adapters
    adapter_saved_per_token: int = 0      # bytes one bottleneck adapter saves per token (h and z)
    virtual_tokens: int = 0               # prompt tuning: extra positions in every row
    prefix_tokens: int = 0                # prefix tuning: extra key/value positions
    names: list[str] = field(default_factory=list)


def _cfg_name(cfg) -> str:
    return type(cfg).__name__


def _match_targets(spec, layer: int, name: str, *, default: Iterable[str]) -> bool:
    """Does a PEFT-style ``target_modules`` spec select linear ``name`` of block ``layer``?"""
    if spec is None:
        return name in default
    full = f"model.layers.{layer}.{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}"
    if isinstance(spec, str):
        if spec == "all-linear":
            return True
        return re.fullmatch(spec, full) is not None
    return any(full == t or full.endswith("." + t) for t in spec)


def _layers_selected(spec, layer: int) -> bool:
    if spec is None:
        return True
    return layer in ([spec] if isinstance(spec, int) else list(spec))


def _lora_rank(cfg, layer: int, name: str) -> int:
    full = f"model.layers.{layer}.{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}"
    for pat, r in (getattr(cfg, "rank_pattern", None) or {}).items():
        if re.fullmatch(rf"(.*\.)?{pat}", full):
            return int(r)
    return int(cfg.r)


def build_plan(shape: ModelShape, methods: list, *, quantize: bool, act_bytes: int) -> Plan:
    """How ``methods`` (config objects or the names "full"/"lora") change each linear of ``shape``."""
    from ..methods import registry
    from ..nn.sparse import default_nnz

    L = shape.layers
    plan = Plan(linears=[{n: LinearPlan(quantized=quantize) for n in LINEARS} for _ in range(L)],
                layer_trains=[False] * L)
    shapes = shape.linear_shapes()
    for m in methods:
        if m == "full":
            plan.names.append("full")
            if quantize:
                raise ValueError("full fine-tuning cannot train 4-bit weights: quantize must be False")
            plan.embed_trains = plan.head_trains = plan.norms_train = True
            plan.layer_trains = [True] * L
            for layer in plan.linears:
                for lp in layer.values():
                    lp.weight_trains = lp.saves_input = True
            continue
        name = registry.method_name(m)
        plan.names.append(name)
        if name == "lora":
            for i, layer in enumerate(plan.linears):
                if not _layers_selected(m.layers_to_transform, i):
                    continue
                for n, lp in layer.items():
                    if getattr(m, "exclude_modules", None) and _match_targets(m.exclude_modules, i, n, default=()):
                        continue
                    if not _match_targets(m.target_modules, i, n, default=LORA_DEFAULT_TARGETS):
                        continue
                    out_f, in_f = shapes[n]
                    r = _lora_rank(m, i, n)
                    lp.saves_input = True
                    lp.lora_r += r
                    lp.extra_saved_per_token += r * act_bytes
                    if m.lora_dropout > 0:
                        lp.extra_saved_per_token += in_f  # bool dropout mask
                    lp.trainable += [r * in_f, r * out_f]
                    if m.use_dora:
                        lp.trainable.append(out_f)
                    if m.lora_bias:
                        lp.trainable.append(out_f)
        elif name == "bitfit":
            for i, layer in enumerate(plan.linears):
                for n, lp in layer.items():
                    if _match_targets(m.target_modules, i, n, default=LINEARS) and not (
                            m.exclude_modules and _match_targets(m.exclude_modules, i, n, default=())):
                        lp.trainable.append(shapes[n][0])
            plan.norms_train = plan.norms_train or m.train_norms
        elif name == "sparse":
            for i, layer in enumerate(plan.linears):
                for n, lp in layer.items():
                    if _match_targets(m.target_modules, i, n, default=LINEARS) and not (
                            m.exclude_modules and _match_targets(m.exclude_modules, i, n, default=())):
                        out_f, in_f = shapes[n]
                        positions = default_nnz(out_f, in_f, m.density, m.block_size)
                        lp.saves_input = True
                        lp.trainable.append(positions * max(m.block_size, 1) ** 2)
                        lp.persistent_bytes += 8 * positions  # int64 flat indices (of entries or tiles)
        elif name == "ia3":
            targets, ff = (m.target_modules, m.feedforward_modules) if m.target_modules is not None else \
                IA3_DEFAULT_TARGETS
            for i, layer in enumerate(plan.linears):
                for n, lp in layer.items():
                    if not _match_targets(targets, i, n, default=()):
                        continue
                    out_f, in_f = shapes[n]
                    if _match_targets(ff, i, n, default=()):
                        lp.trainable.append(in_f)
                        lp.extra_saved_per_token += in_f * act_bytes   # the scaled input
                    else:
                        lp.trainable.append(out_f)
                        lp.extra_saved_per_token += out_f * act_bytes  # the unscaled output
        elif name == "adapter":
            kinds = ("attn", "ffn") if m.placement == "houlsby" else ("ffn",)
            points = len(kinds)
            r = m.bottleneck_for(shape.hidden)
            layers = m.layer_indices(L)
            for i in layers:
                plan.adapter_points[i] = kinds
            per_point = [shape.hidden * r, r, r * shape.hidden, shape.hidden]
            if m.scaling == "learned":
                per_point.append(1)
            for _ in range(points * len(layers)):
                plan.extra_trainable += per_point
            if m.scaling != "learned":
                plan.extra_persistent += 4 * points * len(layers)   # the fixed scale, an fp32 buffer
            # each adapter saves its input h and the [T, r] pre-activation
            plan.adapter_saved_per_token = (shape.hidden + r) * act_bytes
        elif name == "prompt_tuning":
            plan.extra_trainable.append(m.num_virtual_tokens * shape.hidden)
            plan.virtual_tokens += m.num_virtual_tokens
        elif name == "prefix_tuning":
            kvd = shape.kv_heads * shape.head_dim
            plan.extra_trainable.append(m.num_virtual_tokens * 2 * L * kvd)
            plan.prefix_tokens += m.num_virtual_tokens
        elif name == "freeze":
            if m.layers is not None:
                chosen = sorted({i % L for i in m.layers})
                roles = None
            elif m.last_k is not None:
                chosen = list(range(L - m.last_k, L))
                roles = None
            else:
                chosen = list(range(L))
                roles = [n for n in LINEARS if any(_pattern_hits(p, n) for p in m.layer_patterns)]
            for i in chosen:
                if roles is None:
                    plan.layer_trains[i] = True
                for n, lp in plan.linears[i].items():
                    if roles is None or n in roles:
                        lp.weight_trains = lp.saves_input = True
                        lp.quantized = False
            for i in range(L):
                if i not in chosen or roles is not None:
                    for n, lp in plan.linears[i].items():
                        if not lp.weight_trains:
                            lp.quantized = lp.quantized or m.quantize_frozen
            plan.embed_trains |= m.train_embeddings
            plan.head_trains |= m.train_head
            plan.norms_train |= m.train_norms
    return plan


def _pattern_hits(pattern: str, linear: str) -> bool:
    part = "self_attn" if linear in LINEARS[:4] else "mlp"
    comps = f"{part}.{linear}".split(".")
    want = pattern.split(".")
    return any(comps[k:k + len(want)] == want for k in range(len(comps)))


# ================================================================== the estimate
def _as_methods(method, lora_r: int) -> list:
    """``method`` as a list of configs / "full"; a bare name gets that method's defaults."""
    from ..methods import registry
    from ..methods.lora import LoraConfig

    items = list(method) if isinstance(method, (list, tuple)) else [method]
    out = []
    for m in items:
        if m is None or m == "full" or m == "none":
            out.append("full")
        elif isinstance(m, str):
            key = m.strip().lower()
            if key in ("lora", "qlora"):
                out.append(LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
            elif key == "dora":
                out.append(LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear", use_dora=True))
            elif key in ("prompt_tuning", "prefix_tuning"):
                out.append(registry.config_from_dict(key, {"num_virtual_tokens": 20}))
            elif key == "freeze":
                out.append(registry.config_from_dict(key, {"last_k": 1}))
            else:
                out.append(registry.config_from_dict(key, {}))
        elif isinstance(m, dict):
            d = dict(m)
            name = d.pop("method", None)
            if name is None:
                raise ValueError(f"a method dict needs a 'method' key, got keys {sorted(m)}")
            out.append(registry.config_from_dict(name, d))
        else:
            registry.method_name(m)
            out.append(m)
    return out


def _quant_weight_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one Linear4bit weight: packed codes, absmax, code books (see nn/linear4bit.py)."""
    nblocks = math.ceil(numel / blocksize)
    b = (numel + 1) // 2 + 16 * 4  # packed nibbles + the 16-entry code book
    if double_quant:
        b += nblocks + math.ceil(nblocks / 256) * 4 + 256 * 4  # uint8 absmax, fp32 nested absmax, 8-bit map
    else:
        b += nblocks * 4
    return b


def estimate_memory(model_config, *, method="lora", seq_len: int = 512, batch_size: int = 1, quantize: bool = False,
                    precision: str = "fp32", gradient_checkpointing: bool = False, optimizer: str = "adamw",
                    lora_r: int = 16, device: str = "cuda", blocksize: int = 64, double_quant: bool = True,
                    attn_implementation: Optional[str] = None, weight_dtype: Optional[str] = None,
                    fused_cross_entropy: bool = False, ce_chunk_bytes: Optional[int] = None,
                    quantize_embeddings: bool = False, quantize_head: bool = False,
                    offload_activations: bool = False, fused_kernels=False,
                    optimizer_in_backward: bool = False) -> MemoryEstimate:
    """Estimated peak bytes of one training step (forward, backward, optimizer step) for a model config.

    Args:
        model_config: a transformers ``PretrainedConfig`` or a ``config.json`` dict of a Llama-style decoder.
        method: "lora" (``lora_r`` on all linear layers), "qlora" (the same; pass ``quantize=True``), "dora",
            "full" (every parameter trains), another method name with its defaults, a method config
            object (``LoraConfig(...)``...), a ``{"method": name, ...}`` dict, or a list of those.
        seq_len, batch_size: tokens per row and rows per micro-batch.
        quantize: the block linears are NF4 (``blocksize``, ``double_quant``); the head stays dense.
        precision: "fp32" | "bf16" | "fp16" — the compute dtype of the step.
        weight_dtype: the dtype the model was loaded in (default: ``precision``). "fp32" with a 16-bit
            ``precision`` is mixed precision under ``torch.autocast`` (the Trainer's bf16/fp16): fp32 weights
            and residual stream, 16-bit linear outputs and attention, autocast's cast copies.
        gradient_checkpointing: transformers' per-layer (non-reentrant) checkpointing.
        optimizer: "adamw" | "adamw8bit" | "paged_adamw8bit" | "sgd".
        device: "cuda" (multi-tensor AdamW, the cached dequantization workspace) or "cpu".
        attn_implementation: overrides the config's ("sdpa" | "eager" | "flash_attention_2").
        fused_cross_entropy: the loss is the fused linear cross-entropy (the Trainer's default), with
            ``ce_chunk_bytes`` per logits chunk (default ``ops.fused_ce.DEFAULT_CHUNK_BYTES`` of ``device``);
            False: transformers' loss over the full logits.
        quantize_embeddings, quantize_head: the input table / output head are 4-bit
            (``quantize_model(quantize_embeddings=, quantize_head=)``; both or neither when tied).
        offload_activations: checkpoints offloaded to pinned host memory (needs gradient_checkpointing;
            changes nothing on ``device="cpu"``, where they already live in host memory).
        fused_kernels: the fused RMSNorm and SwiGLU modules (``prepare(fused_kernels=...)``): True, False, or
            a dict ``{"rmsnorm": bool, "swiglu": bool, "rope": bool}`` (``rope`` is accepted and changes nothing:
            the fused RoPE saves cos and sin, as transformers' expression does).
        optimizer_in_backward: ``TrainConfig.optimizer_in_backward``: each parameter updated inside backward
            (``train.optim.StepInBackward``), so the gradients never all exist at once.

    Raises ValueError naming every bad argument.
    """
    problems = []
    for key, v in (("seq_len", seq_len), ("batch_size", batch_size), ("lora_r", lora_r)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{key}={v!r} (must be a positive integer)")
    if precision not in PRECISION_BYTES:
        problems.append(f"precision={precision!r} (one of {list(PRECISION_BYTES)})")
    if weight_dtype is not None and weight_dtype not in PRECISION_BYTES:
        problems.append(f"weight_dtype={weight_dtype!r} (one of {list(PRECISION_BYTES)})")
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer={optimizer!r} (one of {list(OPTIMIZERS)})")
    if device not in DEVICES:
        problems.append(f"device={device!r} (one of {list(DEVICES)})")
    for key, v in (("quantize", quantize), ("gradient_checkpointing", gradient_checkpointing),
                   ("double_quant", double_quant), ("fused_cross_entropy", fused_cross_entropy),
                   ("quantize_embeddings", quantize_embeddings), ("quantize_head", quantize_head),
                   ("offload_activations", offload_activations), ("optimizer_in_backward", optimizer_in_backward)):
        if not isinstance(v, bool):
            problems.append(f"{key}={v!r} (must be True or False)")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        problems.append(f"blocksize={blocksize!r} (a power of two from 32 to 4096)")
    if attn_implementation is not None and attn_implementation not in ATTENTION:
        problems.append(f"attn_implementation={attn_implementation!r} (one of {list(ATTENTION)})")
    if ce_chunk_bytes is not None and (isinstance(ce_chunk_bytes, bool) or not isinstance(ce_chunk_bytes, int)
                                       or ce_chunk_bytes < 1):
        problems.append(f"ce_chunk_bytes={ce_chunk_bytes!r} (must be a positive integer or None)")
    if offload_activations is True and gradient_checkpointing is False:
        problems.append("offload_activations=True needs gradient_checkpointing=True (it offloads the checkpoints)")
    fused = _fused_flags(fused_kernels, problems)
    if problems:
        raise ValueError("invalid estimate_memory argument(s): " + "; ".join(problems))
    shape = model_shape(model_config)
    if shape.tie_embeddings and quantize_embeddings != quantize_head:
        raise ValueError("invalid estimate_memory argument(s): the config ties the head to the input embeddings, "
                         "so quantize_embeddings and quantize_head must both be True or both False")
    if attn_implementation is not None:
        shape = dataclasses.replace(shape, attn_implementation=attn_implementation)
    methods = _as_methods(method, lora_r)
    a = PRECISION_BYTES[weight_dtype or precision]
    # autocast computes in the 16-bit precision over fp32 weights; 16-bit weights compute in their own dtype
    A = PRECISION_BYTES[precision] if a == 4 else a
    plan = build_plan(shape, methods, quantize=quantize, act_bytes=A)
    if plan.prefix_tokens and gradient_checkpointing:
        raise ValueError("prefix tuning does not work with gradient checkpointing")
    if (quantize_embeddings and plan.embed_trains) or (quantize_head and plan.head_trains):
        raise ValueError("invalid estimate_memory argument(s): a 4-bit table does not train; the method trains "
                         "the embeddings or the head")
    if fused_cross_entropy and ce_chunk_bytes is None:
        from ..ops.fused_ce import DEFAULT_CHUNK_BYTES
        ce_chunk_bytes = DEFAULT_CHUNK_BYTES[device]
    switches = Switches(fused_ce=fused_cross_entropy, ce_chunk=ce_chunk_bytes or 0, q_embed=quantize_embeddings,
                        q_head=quantize_head or (shape.tie_embeddings and quantize_embeddings),
                        offload=offload_activations and device == "cuda", fused_rmsnorm=fused[0],
                        fused_swiglu=fused[1], step_in_backward=optimizer_in_backward)
    return _estimate(shape, plan, seq_len=seq_len, batch=batch_size, a=a, A=A, gc=gradient_checkpointing,
                     optimizer=optimizer, device=device, blocksize=blocksize, double_quant=double_quant, sw=switches,
                     settings={"fused_cross_entropy": fused_cross_entropy, "quantize_embeddings": quantize_embeddings,
                               "quantize_head": quantize_head, "offload_activations": offload_activations,
                               "fused_rmsnorm": fused[0], "fused_swiglu": fused[1],
                               "optimizer_in_backward": optimizer_in_backward,
                               "method": "+".join(plan.names), "seq_len": seq_len, "batch_size": batch_size,
                               "precision": precision, "weight_dtype": weight_dtype or precision, "quantize": quantize,
                               "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer,
                               "device": device, "attn_implementation": shape.attn_implementation})


@dataclass(frozen=True)
class Switches:
    """The memory switches of issue #7 that change the estimate (see the module docstring)."""

    fused_ce: bool = False     # fused linear cross-entropy instead of the full-logits loss
    ce_chunk: int = 0          # its chunk byte budget
    q_embed: bool = False      # 4-bit input embeddings
    q_head: bool = False       # 4-bit output head
    offload: bool = False      # checkpoints in pinned host memory (CUDA)
    fused_rmsnorm: bool = False  # ops/fused_layers.rms_norm: saves x itself + rstd, not a float32 copy
    fused_swiglu: bool = False   # ops/fused_layers.swiglu: saves gate and up, SiLU recomputed
    step_in_backward: bool = False  # train.optim.StepInBackward: one gradient alive at a time


def _fused_flags(fused_kernels, problems: list) -> tuple[bool, bool]:
    """(rmsnorm, swiglu) from ``fused_kernels`` (True / False / a dict of rmsnorm / swiglu / rope; rope counts
    for nothing: the fused RoPE saves what transformers' RoPE saves, cos and sin)."""
    if isinstance(fused_kernels, bool):
        return fused_kernels, fused_kernels
    if isinstance(fused_kernels, dict) and set(fused_kernels) <= {"rmsnorm", "swiglu", "rope"} and all(
            isinstance(v, bool) for v in fused_kernels.values()):
        return fused_kernels.get("rmsnorm", True), fused_kernels.get("swiglu", True)
    problems.append(f"fused_kernels={fused_kernels!r} (True, False or a dict of 'rmsnorm' / 'swiglu' / 'rope' "
                    "booleans)")
    return False, False


def _fused_ce_terms(*, n: int, T: int, h: int, V: int, a: int, A: int, chunk: int, device: str,
                    head_sliced: bool) -> tuple[int, int]:
    """(forward, backward) bytes of the fused linear cross-entropy at its peaks (``ops/fused_ce.py``)."""
    rows = max(1, min(n, chunk // (V * A)))
    fwd = n * h * a + n * h * 4 + n * 16          # the selected hidden rows, dH, row indices + loss/lse rows
    fwd += rows * V * A                           # the logits chunk, reused
    if device == "cpu":
        fwd += 2 * rows * V * 4                   # the plain-torch row work's float32 temporaries
    if head_sliced:                               # one vocabulary slice of W in the compute dtype + its logits
        v_s = min(V, max(1, chunk // (h * A)))
        fwd += v_s * h * A + (rows * v_s * A if v_s < V else 0)
    bwd = 2 * n * h * 4 + T * h * a               # dH and its scaled copy, the hidden-state gradient
    return fwd, bwd


def _estimate(shape: ModelShape, plan: Plan, *, seq_len: int, batch: int, a: int, A: int, gc: bool, optimizer: str,
              device: str, blocksize: int, double_quant: bool, settings: dict,
              sw: Switches = Switches()) -> MemoryEstimate:
    """``a``: bytes per element of the dense weights and the residual stream; ``A``: of the compute
    (linear outputs, attention); they differ under autocast (fp32 weights, 16-bit compute)."""
    ac = A != a
    h, I, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    nh, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    s = seq_len + plan.virtual_tokens          # positions per row the layers see
    T = batch * s                              # tokens through the layers
    s_kv = s + plan.prefix_tokens
    shapes = shape.linear_shapes()

    # ---------------------------------------------------------------- persistent: weights
    dense = quant = 0
    trainable_sizes: list[int] = []          # fp32 adapter-like tensors (elements)
    trained_dense_sizes: list[int] = []      # dense weights that train (elements, precision dtype)
    largest_quant = 0
    for i, layer in enumerate(plan.linears):
        for n, lp in layer.items():
            out_f, in_f = shapes[n]
            numel = out_f * in_f
            bias = out_f if shape.linear_has_bias(n) else 0
            if lp.weight_trains:
                trained_dense_sizes.append(numel)
                if bias:
                    trained_dense_sizes.append(bias)
            elif lp.quantized:
                quant += _quant_weight_bytes(numel, blocksize, double_quant)
                dense += bias * a
                largest_quant = max(largest_quant, numel)
            else:
                dense += (numel + bias) * a
            trainable_sizes += lp.trainable
            dense += lp.persistent_bytes
        norms = [h, h]
        if plan.layer_trains[i] or plan.norms_train:
            trained_dense_sizes += norms
        else:
            dense += sum(norms) * a
    outer = [V * h, h] + ([] if shape.tie_embeddings else [V * h])   # embedding, final norm, head
    outer_train = [plan.embed_trains, plan.norms_train,
                   plan.head_trains or (shape.tie_embeddings and plan.embed_trains)]
    outer_4bit = [sw.q_embed, False, sw.q_head]
    for numel, trains, four_bit in zip(outer, outer_train, outer_4bit):
        if trains:
            trained_dense_sizes.append(numel)
        elif four_bit:
            quant += _quant_weight_bytes(numel, blocksize, double_quant)
        else:
            dense += numel * a
    if shape.tie_embeddings and sw.q_head and not sw.q_embed:
        quant += _quant_weight_bytes(V * h, blocksize, double_quant)  # the tied table is the head's
    dense += 2 * (d // 2) * 4   # rotary inv_freq and original_inv_freq buffers (fp32)
    dense += plan.extra_persistent
    trainable_sizes += plan.extra_trainable
    n_adapter = sum(trainable_sizes)
    n_dense_trained = sum(trained_dense_sizes)
    trainable_params = n_adapter + n_dense_trained
    trainable_bytes = 4 * n_adapter + a * n_dense_trained

    # optimizer state
    if optimizer == "adamw":
        opt_state = 2 * trainable_bytes  # exp_avg and exp_avg_sq, each in its parameter's dtype
    elif optimizer in ("adamw8bit", "paged_adamw8bit"):
        opt_state = 2 * trainable_params + 2 * 4 * math.ceil(trainable_params / 256)
    else:
        opt_state = 0
    grads = trainable_bytes  # one gradient per trainable parameter, in its dtype
    if sw.q_head and not sw.fused_ce:
        largest_quant = max(largest_quant, V * h)          # the whole head is dequantized for the logits
    elif sw.q_head:
        largest_quant = max(largest_quant, min(V, max(1, sw.ce_chunk // (h * A))) * h)   # one vocabulary slice
    workspace = largest_quant * A if device == "cuda" else 0
    persistent = {"weights": dense + quant, "trainable": trainable_bytes, "optimizer_state": opt_state,
                  "dequant_workspace": workspace}

    # ---------------------------------------------------------------- saved activations, one layer
    grad_layers = _grad_layers(plan, L, gc)  # blocks gradients pass through
    n_grad = len(grad_layers)
    first = grad_layers[0] if grad_layers else L
    # transformers' checkpointing also makes the embedding output require grad (enable_input_require_grads)
    input_needs_grad = plan.embed_trains or plan.virtual_tokens > 0 or plan.prefix_tokens > 0 or gc

    kv_repeated = shape.attn_implementation == "eager" or (plan.prefix_tokens > 0 and nh != kvh)

    def trains(lp: LinearPlan) -> bool:
        return bool(lp.trainable) or lp.weight_trains

    def flags(i: int) -> dict:
        """Where gradients flow inside block i. Above the first block gradients reach, everything; in that
        block only from the first trained piece on (a frozen attention under an MLP-only method saves nothing)."""
        layer = plan.linears[i]
        norm_w = plan.norms_train or plan.layer_trains[i]
        x_grad = i > first or input_needs_grad
        attn = x_grad or norm_w or any(trains(layer[n]) for n in ("q_proj", "k_proj", "v_proj"))
        h1 = attn or trains(layer["o_proj"]) or "attn" in plan.adapter_points.get(i, ())
        mlp = h1 or norm_w or trains(layer["gate_proj"]) or trains(layer["up_proj"])
        return {"x": x_grad, "norm_w": norm_w, "attn": attn, "h1": h1, "mlp": mlp}

    def norm_input_saved(i: int) -> bool:
        """Block i's input RMSNorm keeps its input: it requires grad or the norm weight trains."""
        f = flags(i)
        return f["x"] or f["norm_w"]

    def out_bytes(lp: LinearPlan, in_b: int) -> int:
        """Bytes per element of a linear's output: the compute dtype, except that a 4-bit layer (and LoRA
        over one) keeps its input's dtype under autocast (its op is not an autocast op)."""
        if ac and lp.quantized and not lp.weight_trains:
            return in_b
        return A

    def linears_saved(layer: dict, names: tuple, in_b: int, in_f: int, needs_grad: bool) -> tuple[int, int]:
        """(bytes saved by the linears ``names`` reading one input [T, in_f] of ``in_b`` bytes per element,
        of which the shared input itself). A layer that saves its input keeps it (once for all of them) or,
        under autocast when the input is not in the compute dtype, its own cast copy; a plain dense linear
        under autocast keeps its weight's cast copy."""
        b = shared = 0
        for n in names:
            lp = layer[n]
            out_f = shapes[n][0]
            if lp.saves_input:
                if ac and in_b != A:
                    b += T * in_f * A
                else:
                    shared = T * in_f * in_b
            if ac and not lp.quantized and not lp.lora_r and (needs_grad or lp.weight_trains):
                b += out_f * in_f * A
        return b + shared, shared

    # an RMSNorm keeps its input as float32 (a copy, or the residual itself when that is fp32) + rsqrt per row;
    # the fused RMSNorm keeps the input tensor itself, whatever its dtype
    norm_saved = (T * h * a if sw.fused_rmsnorm else T * h * 4) + T * 4

    def layer_parts(i: int) -> tuple[int, int]:
        """(bytes block ``i`` keeps for backward without checkpointing, of which the down_proj input)."""
        layer = plan.linears[i]
        f = flags(i)
        b = 0
        # input RMSNorm: fp32 input (a copy, or the residual itself when that is fp32) + rsqrt; its output
        # (in the weights' dtype) when the norm weight trains
        if norm_input_saved(i):
            b += norm_saved
        if f["norm_w"] and not sw.fused_rmsnorm:
            b += T * h * a
        b += linears_saved(layer, ("q_proj", "k_proj", "v_proj"), a, h, f["x"] or f["norm_w"])[0]
        # attention (nothing when no input of it requires grad); it saves q, k, v in the compute dtype
        if f["attn"]:
            kv_width = nh if kv_repeated else kvh
            b += T * nh * d * A + 2 * batch * kv_width * s_kv * d * A      # q, k, v (k/v repeated per head)
            if shape.attn_implementation == "eager":
                b += batch * nh * s * s_kv * (4 + (A if A != 4 else 0))     # softmax probs fp32 (+ 16-bit copy)
            else:
                b += T * nh * d * A + batch * nh * s * 4                    # output (= o_proj input), log-sum-exp
        o_saved, o_shared = linears_saved(layer, ("o_proj",), A, nh * d, f["attn"])
        if shape.attn_implementation != "eager" and f["attn"]:
            o_saved -= o_shared                                             # SDPA's saved output itself
        b += o_saved
        # post-attention RMSNorm on the residual h1 (in the weights' dtype: a 16-bit branch output is promoted)
        if f["h1"] or f["norm_w"]:
            b += norm_saved + (T * h * a if f["norm_w"] and not sw.fused_rmsnorm else 0)
        b += linears_saved(layer, ("gate_proj", "up_proj"), a, h, f["h1"] or f["norm_w"])[0]
        g_b, u_b = out_bytes(layer["gate_proj"], a), out_bytes(layer["up_proj"], a)
        if f["mlp"]:
            # gate out, SiLU out, up out (fused SwiGLU: gate and up only, SiLU recomputed)
            b += T * I * (g_b + u_b if sw.fused_swiglu else 2 * g_b + u_b)
        down, _ = linears_saved(layer, ("down_proj",), max(g_b, u_b), I, f["mlp"])
        b += down
        b += int(T * sum(lp.extra_saved_per_token for lp in layer.values()))
        b += T * plan.adapter_saved_per_token * len(plan.adapter_points.get(i, ()))
        down_input = down - (shapes["down_proj"][0] * I * A if ac and not layer["down_proj"].quantized
                             and not layer["down_proj"].lora_r and f["mlp"] else 0)
        return b, down_input if layer["down_proj"].saves_input else 0

    def layer_saved(i: int) -> int:
        return layer_parts(i)[0]

    def mlp_act_bytes(i: int) -> int:
        layer = plan.linears[i]
        return max(out_bytes(layer["gate_proj"], a), out_bytes(layer["up_proj"], a))

    per_layer = [layer_saved(i) if i in grad_layers else 0 for i in range(L)]
    final = norm_saved if n_grad or plan.norms_train else 0             # final RMSNorm input + rsqrt
    if plan.norms_train and not sw.fused_rmsnorm:
        final += T * h * a
    if plan.head_trains:
        final += T * h * A                                                # lm_head input (its cast under autocast)
    if ac and n_grad and not sw.q_head:
        final += V * h * A                                                # lm_head's weight cast to 16 bits
    rope = 2 * s * d * a                                                  # cos, sin
    inputs = 3 * batch * seq_len * 8                                      # ids, labels, shifted labels
    if plan.prefix_tokens:
        inputs += batch * s * s_kv                                        # the 4-D boolean attention mask
    fixed = final + rope + inputs
    if gc:
        # only each grad layer's input (the checkpoint) is kept; one layer is recomputed in its backward
        checkpoints = (min(n_grad, 3) if sw.offload else n_grad) * T * h * a
        saved_all = checkpoints + fixed
    else:
        saved_all = sum(per_layer) + fixed

    # ---------------------------------------------------------------- phases
    if sw.fused_ce:
        head_sliced = sw.q_head or (a != A and not plan.head_trains)
        logits_fwd, loss_bwd = _fused_ce_terms(n=batch * (seq_len - 1), T=T, h=h, V=V, a=a, A=A, chunk=sw.ce_chunk,
                                               device=device, head_sliced=head_sliced)
    else:
        lb = a if (sw.q_head and ac) else A   # a 4-bit head's logits are in its input's dtype under autocast
        logits_fwd = T * V * lb + (T * V * 4 if lb != 4 else 0) + T * V * 4   # logits, fp32 copy, log-softmax
        loss_bwd = 3 * T * V * 4                                              # log-softmax out, dNLL, dlogits
        if sw.q_head and device == "cpu":
            logits_fwd += V * h * lb                                          # the head dequantized (transient)

    def layer_backward(i: int) -> int:
        """Block i's own bytes at its backward peak, the SwiGLU product's backward: its saved tensors
        minus the down_proj input (freed once down_proj's backward has run), plus d(product), d(SiLU
        out), d(up out) and the block's output gradient."""
        own = per_layer[i] - layer_parts(i)[1]
        if gc and (a == 4 or sw.fused_rmsnorm) and norm_input_saved(i):
            own -= T * h * a   # the recomputed norm input is the checkpoint itself
        if sw.fused_swiglu and device == "cpu":
            from ..ops.fused_layers import CPU_BACKWARD_CHUNK
            # the plain-torch SwiGLU backward's float32 temporaries over one slice: sigmoid and four products,
            # plus the casts of gate, up and dh when those are 16-bit
            n_tmp = 4 + (3 if mlp_act_bytes(i) != 4 else 0)
            own += n_tmp * 4 * min(CPU_BACKWARD_CHUNK, T * I)
        return own + 3 * T * I * mlp_act_bytes(i) + T * h * a

    head_grads = a * sum(n for n, t in zip(outer, outer_train) if t)
    layer_grads = [sum(4 * sum(lp.trainable) + (a * _dense_layer_numel(shape, n) if lp.weight_trains else 0)
                       for n, lp in plan.linears[i].items()) + (a * 2 * h if plan.layer_trains[i] or plan.norms_train
                                                               else 0) for i in range(L)]
    kept = rope + inputs   # held until the step ends
    if n_grad:
        last, acts_below_last = L - 1, (n_grad - 1) * T * h * a if gc else sum(per_layer[:L - 1])
        first_ckpt = T * h * a if gc else 0
        if gc and sw.offload:
            acts_below_last = min(n_grad - 1, 2) * T * h * a
        bwd_last = {"activations": acts_below_last + (T * h * a if gc else 0) + kept,
                    "layer_backward": layer_backward(last), "gradients": head_grads}
        bwd_first = {"activations": first_ckpt + kept, "layer_backward": layer_backward(first),
                     "gradients": grads - layer_grads[first]}
    else:
        bwd_last = bwd_first = {"activations": kept, "gradients": grads}
    if sw.step_in_backward:
        # each parameter is updated (and its gradient freed) as soon as its gradient is complete: no phase holds
        # more than one gradient, and the step's temporaries are those of one parameter (2x the largest)
        one = 2 * max([4 * n for n in trainable_sizes] + [a * n for n in trained_dense_sizes] + [0]) \
            if optimizer == "adamw" else 0
        largest = max([4 * n for n in trainable_sizes] + [a * n for n in trained_dense_sizes] + [0])
        for ph in (bwd_last, bwd_first):
            ph["gradients"] = largest
            ph["optimizer_temporaries"] = one
    phases = {
        "forward": {"activations": saved_all, "logits": logits_fwd},
        "loss_backward": {"activations": saved_all, "logits": loss_bwd},
        "backward_last_layer": bwd_last,
        "backward_first_layer": bwd_first,
        "optimizer_step": {"gradients": grads, "optimizer_temporaries": _opt_temp(
            optimizer, device, trainable_sizes, trained_dense_sizes, a)},
    }
    if sw.step_in_backward:
        del phases["optimizer_step"]  # it happened inside the backward phases
    base = sum(persistent.values())
    totals = {k: base + sum(v.values()) for k, v in phases.items()}
    peak = max(totals, key=totals.get)
    breakdown = {**persistent, **phases[peak]}
    return MemoryEstimate(total_bytes=int(totals[peak]), breakdown={k: int(v) for k, v in breakdown.items()},
                          phases={k: int(v) for k, v in totals.items()}, peak_phase=peak,
                          trainable_params=int(trainable_params), settings=settings)


def _dense_layer_numel(shape: ModelShape, name: str) -> int:
    out_f, in_f = shape.linear_shapes()[name]
    return out_f * in_f


def _grad_layers(plan: Plan, L: int, gc: bool = False) -> list[int]:
    """Blocks that backward passes through: from the lowest block holding anything trainable (or from
    block 0 when the embeddings / a prompt train, or with transformers' checkpointing, which makes the
    embedding output require grad) to the top."""
    if plan.embed_trains or plan.virtual_tokens or plan.prefix_tokens or gc:
        return list(range(L))
    for i in range(L):
        if plan.layer_trains[i] or plan.norms_train or i in plan.adapter_points or any(
                lp.trainable or lp.weight_trains for lp in plan.linears[i].values()):
            return list(range(i, L))
    return []


def _opt_temp(optimizer: str, device: str, adapter_sizes: list[int], dense_sizes: list[int], a: int) -> int:
    """AdamW's temporaries during ``step`` (in each parameter's dtype: adapters fp32, trained weights ``a``
    bytes): CUDA multi-tensor: sqrt(v) for every parameter at once; CPU per-tensor: sqrt(v) and its scaled
    copy for the largest parameter."""
    if optimizer != "adamw":
        return 0
    sizes = [4 * n for n in adapter_sizes] + [a * n for n in dense_sizes]
    if not sizes:
        return 0
    if device == "cuda":
        return sum(sizes)
    return 2 * max(sizes)


def llama_config(name: str) -> dict:
    """Config dicts of well-known shapes, for estimates without a download: "llama-3-8b", "llama-3-70b"."""
    shapes = {
        "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256),
        "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, vocab_size=128256),
    }
    if name not in shapes:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(shapes)}")
    return {"model_type": "llama", "tie_word_embeddings": False, **shapes[name]}


__all__ = ["estimate_memory", "MemoryEstimate", "ModelShape", "model_shape", "llama_config", "CONFIG_FIELDS",
           "known_config_keys", "build_plan"]
