"""Sparse fine-tuning (issue #8): a trainable sparse delta over each targeted linear layer.

    cfg = SparseConfig(density=0.01, selection="magnitude", regrow_every=100)
    model = apply(model, cfg)                     # SparseLinear over every targeted Linear/Conv1D/Linear4bit
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)
    dag = DropAndGrow(model, opt)                  # optional: SpIEL-style drop-and-grow
    for batch in data:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad(); dag.step()
    save_sparse(model, "out/")                     # indices + values, safetensors + JSON
    model = merge_and_unload(model)                # W + Δ into the base (4-bit: mode="requantize"/"dequantize")

Selection (per layer, P = N*K entries or the number of b×b tiles, nnz = max(1, round(density * P))):

* ``"random"``: nnz distinct positions drawn uniformly from a ``torch.Generator`` seeded with ``seed``
  (layers in model order share one generator, so a config reproduces its selection).
* ``"magnitude"``: the nnz entries of largest |W| (W dequantized for a 4-bit base, in row chunks, never
  whole); with tiles, the nb tiles of largest Σ W² over their in-range elements.
* ``"gradient"``: needs calibration batches (:func:`select_by_gradient`): a random start selection plus
  ``ceil(candidate_multiplier * nnz) - nnz`` random extra candidates are scored by the accumulated gradient
  over the batches — the selected entries by the values' own gradient, the extra candidates through the ops'
  grow hook (a sampled dense-dense product at those positions, never a dense gradient) — and the nnz of
  largest |Σ grad| (tiles: Frobenius norm of the summed gradient tile) are kept.

Drop-and-grow (:class:`DropAndGrow`, SpIEL-style, Ansell et al. 2024): every ``regrow_every`` optimizer
steps, per layer, with ``d = floor(regrow_fraction * nnz)``:

1. drop the d selected positions of smallest |value| (tiles: smallest Frobenius norm) — the delta is
   θ - θ₀, so this is SpIEL's drop rule;
2. grow the d positions of largest |accumulated gradient| (tiles: Frobenius norm of the accumulated tile)
   among the candidate set, ``ceil(candidate_multiplier * d)`` random unselected positions drawn at the
   previous regrow (or at construction); their gradient is summed over every backward since then;
3. nnz stays constant; indices are re-sorted; the values, their ``.grad`` and every optimizer state tensor
   of the values' shape (AdamW ``exp_avg``/``exp_avg_sq``, ...) are permuted in place so surviving entries
   keep theirs exactly and grown entries start at zero; a fresh candidate set is drawn.

Files (:func:`save_sparse` / :func:`load_sparse`, ``io/method_files.py``): ``adapter_config.json`` with
``peft_type: "SPARSE"``, the config's fields, ``modules`` (name -> shape, block_size, nnz) and the base
model's fingerprint; ``adapter_model.safetensors`` with ``<module>.delta_indices`` (int64) and
``<module>.delta_values`` for each module.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..io.method_files import (FINGERPRINT_KEY, AdapterLoadError, check_fingerprint, check_peft_type,
                               model_fingerprint, read_method_files, write_method_files)
from ..nn.linear4bit import Linear4bit
from ..nn.sparse import (MERGE_MODES, SparseLinear, check_block_size, check_indices, default_nnz, grid_shape,
                         num_positions, values_shape)
from ..ops import reference
from ._common import freeze, get_parent, print_trainable_parameters, trainable_parameters  # noqa: F401
from .targets import ALL_LINEAR, is_linear, output_head_names

PEFT_TYPE = "SPARSE"
FORMAT_VERSION = 1
CONFIG_ATTR = "peft_kernels_sparse_config"
SELECTIONS = ("random", "magnitude", "gradient")
_CHUNK_ELEMS = 1 << 20  # row chunk size for magnitude selection (elements)


# ================================================================== config
@dataclass
class SparseConfig:
    """Sparse fine-tuning hyper-parameters.

    density: fraction of each layer's positions (entries, or tiles with ``block_size``) that train, (0, 1].
    selection: "random" | "magnitude" | "gradient" (see the module docstring).
    block_size: 0 (unstructured) or 16 / 32 (tensor-core friendly tiles).
    target_modules: "all-linear" (every Linear/Conv1D/Linear4bit but the output head), a regex that must
        fullmatch a module name, or a list of names (a module matches an entry equal to its name or to a
        dotted suffix of it); every list entry must match at least one module.
    exclude_modules: same forms; never targeted (list entries must match something too).
    regrow_every: drop-and-grow period in optimizer steps (None: the selection is fixed).
    regrow_fraction: fraction of each layer's nnz dropped and regrown per regrow, (0, 1).
    candidate_multiplier: candidates scored per grown position (>= 1).
    seed: seeds random selection and candidate sampling.
    """

    density: float = 0.01
    selection: str = "random"
    block_size: int = 0
    target_modules: Union[str, list[str]] = ALL_LINEAR
    exclude_modules: Optional[Union[str, list[str]]] = None
    regrow_every: Optional[int] = None
    regrow_fraction: float = 0.1
    candidate_multiplier: float = 4.0
    seed: int = 0

    def __post_init__(self):
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0.0 < d <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {d!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check_block_size(self.block_size)
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (tuple, set)):
                v = sorted(v)
                setattr(self, name, v)
            if v is None and name == "exclude_modules":
                continue
            if not isinstance(v, str) and not (isinstance(v, list) and v and all(isinstance(t, str) for t in v)):
                raise TypeError(f"{name} must be a string (regex or 'all-linear') or a non-empty list of names, "
                                f"got {v!r}")
        re_ = self.regrow_every
        if re_ is not None and (isinstance(re_, bool) or not isinstance(re_, int) or re_ < 1):
            raise ValueError(f"regrow_every must be None or a positive integer, got {re_!r}")
        f = self.regrow_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise ValueError(f"regrow_fraction must be in (0, 1), got {f!r}")
        cm = self.candidate_multiplier
        if isinstance(cm, bool) or not isinstance(cm, (int, float)) or not math.isfinite(cm) or cm < 1.0:
            raise ValueError(f"candidate_multiplier must be a finite number >= 1, got {cm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SparseConfig":
        """From :meth:`to_dict`'s fields (other keys ignored); invalid values raise as in the constructor."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def get_config(model: nn.Module) -> Optional[SparseConfig]:
    """The SparseConfig :func:`apply` / :func:`load_sparse` recorded on ``model`` (None if none)."""
    return getattr(model, CONFIG_ATTR, None)


# ================================================================== matching
def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """(name, layer) of every SparseLinear in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            yield name, m


def _match(spec, names: list[str], what: str) -> set[str]:
    """Names matched by a regex (fullmatch) or a list (equal or dotted suffix); unmatched list entries raise."""
    if isinstance(spec, str):
        return {n for n in names if re.fullmatch(spec, n)}
    out, missing = set(), []
    for entry in spec:
        hit = {n for n in names if n == entry or n.endswith("." + entry)}
        if not hit:
            missing.append(entry)
        out |= hit
    if missing:
        sample = [n for n in names][:6]
        raise ValueError(f"{what} names modules that do not exist in the model: {missing} "
                         f"(modules are named like {sample})")
    return out


def resolve_targets(model: nn.Module, cfg: SparseConfig) -> list[str]:
    """Full names of the linear modules ``cfg`` targets in ``model`` (module order); raises ValueError for
    list entries naming no module, targets that are not linear layers, or an empty result."""
    names = [n for n, _ in model.named_modules() if n]
    linear = {n for n, m in model.named_modules() if n and is_linear(m)}
    spec = cfg.target_modules
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        chosen = linear - output_head_names(model)
    else:
        chosen = _match(spec, names, "target_modules")
        bad = sorted(chosen - linear)
        if bad:
            kinds = {n: type(model.get_submodule(n)).__name__ for n in bad[:4]}
            raise ValueError(f"target_modules matched modules that are not linear layers: {kinds}; sparse "
                             f"fine-tuning supports nn.Linear, transformers Conv1D and Linear4bit")
    if cfg.exclude_modules is not None:
        chosen -= _match(cfg.exclude_modules, names, "exclude_modules")
    found = [n for n in names if n in chosen]
    if not found:
        raise ValueError(f"target_modules {cfg.target_modules!r} (exclude_modules {cfg.exclude_modules!r}) "
                         f"matched no linear layer of {type(model).__name__}; linear layers are named like "
                         f"{sorted(linear)[:6]}")
    return found


# ================================================================== position sampling and scoring
def sample_positions(total: int, count: int, exclude: Optional[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Sorted int64 [min(count, available)]: distinct positions in [0, total) not in ``exclude`` (sorted),
    uniformly at random. Memory O(count + |exclude|) by rejection sampling; a full permutation of ``total``
    is drawn only when more than half of all positions are wanted (then it is the cheaper way)."""
    excl = exclude.cpu() if exclude is not None and exclude.numel() else None
    n_ex = 0 if excl is None else excl.numel()
    count = min(count, total - n_ex)
    if count <= 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * (count + n_ex) > total:
        perm = torch.randperm(total, generator=gen)
        if excl is not None:
            perm = perm[~torch.isin(perm, excl)]
        return perm[:count].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:
        need = count - chosen.numel()
        draw = torch.randint(0, total, (2 * need + 16,), generator=gen)
        if excl is not None:
            draw = draw[~torch.isin(draw, excl)]
        draw = torch.unique(draw[~torch.isin(draw, chosen)])
        # unique() sorts: take a random subset of the fresh draws, not the smallest ones.
        draw = draw[torch.randperm(draw.numel(), generator=gen)[:need]]
        chosen = torch.cat([chosen, draw])
    return chosen.sort().values


def position_scores(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-position score [P] of a values-shaped tensor: |t| (unstructured) or each tile's Frobenius norm."""
    t = t.detach().float()
    return t.abs() if block_size == 0 else t.pow(2).sum(dim=(1, 2)).sqrt()


def _row_chunks(base: nn.Module, align: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows [r, K]) covering ``base``'s weight W [N, K] in chunks of about
    ``_CHUNK_ELEMS`` elements; chunk starts are multiples of ``align`` rows (and, for a 4-bit base, of whole
    quantization blocks). A 4-bit base is dequantized chunk by chunk, never whole."""
    n, k = SparseLinear._shape(base)
    if isinstance(base, Linear4bit):
        qs = base.quant_state
        bs = qs.blocksize
        align = math.lcm(align, bs // math.gcd(k, bs))  # row starts on a block boundary (bs is even)
        nest = qs.nested
        absmax = reference.decode_absmax(qs.absmax, None if nest is None else nest.absmax,
                                         None if nest is None else nest.code, 0.0 if nest is None else nest.offset)
        packed = base.weight.reshape(-1)
    else:
        w = base.weight.detach()
        w = w if isinstance(base, nn.Linear) else w.t()  # transformers Conv1D stores [K, N]
    step = max(align, (_CHUNK_ELEMS // k) // align * align)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        if isinstance(base, Linear4bit):
            e0, numel = r0 * k, (r1 - r0) * k
            rows = reference.dequantize_4bit(packed[e0 // 2: e0 // 2 + (numel + 1) // 2],
                                             absmax[e0 // bs: -(-(e0 + numel) // bs)], qs.code, bs, numel,
                                             torch.float32).view(r1 - r0, k)
        else:
            rows = w[r0:r1].float()
        yield r0, rows


def magnitude_positions(base: nn.Module, nnz: int, block_size: int = 0) -> torch.Tensor:
    """Sorted positions of the ``nnz`` largest |W| entries of ``base`` (or the tiles of largest Σ W² over
    their in-range elements), streaming over row chunks with a running top-k (memory O(nnz + chunk))."""
    n, k = SparseLinear._shape(base)
    b = block_size
    if b == 0:
        best_v = torch.empty(0)
        best_i = torch.empty(0, dtype=torch.int64)
        for r0, rows in _row_chunks(base, 1):
            v, i = rows.abs().reshape(-1).topk(min(nnz, rows.numel()))
            best_v = torch.cat([best_v, v.cpu()])
            best_i = torch.cat([best_i, i.cpu() + r0 * k])
            if best_v.numel() > nnz:
                best_v, keep = best_v.topk(nnz)
                best_i = best_i[keep]
        return best_i.sort().values
    _, gk = grid_shape(n, k, b)
    scores = []
    for _, rows in _row_chunks(base, b):
        tr = -(-rows.shape[0] // b)
        pad = torch.zeros(tr * b, gk * b)
        pad[: rows.shape[0], :k] = rows.cpu().pow(2)
        scores.append(pad.view(tr, b, gk, b).sum(dim=(1, 3)).reshape(-1))
    return torch.cat(scores).topk(nnz).indices.sort().values


def select_positions(base: nn.Module, cfg: SparseConfig, gen: torch.Generator) -> torch.Tensor:
    """The start selection of ``base`` under ``cfg`` (sorted int64 positions): magnitude, or random (also
    the start that "gradient" calibration then revises); random draws come from ``gen``."""
    n, k = SparseLinear._shape(base)
    nnz = default_nnz(n, k, cfg.density, cfg.block_size)
    if cfg.selection == "magnitude":
        return magnitude_positions(base, nnz, cfg.block_size)
    return sample_positions(num_positions(n, k, cfg.block_size), nnz, None, gen)


# ================================================================== apply
def _freeze_base(model: nn.Module) -> None:
    freeze(model)
    for _, layer in sparse_layers(model):
        layer.delta_values.requires_grad_(True)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (the delta values after :func:`apply`)."""
    return [p for p in model.parameters() if p.requires_grad]


def apply(model: nn.Module, cfg: SparseConfig, calibration: Optional[Iterable] = None,
          loss_fn: Optional[Callable] = None) -> nn.Module:
    """Wrap every module ``cfg`` targets in a :class:`~peft_kernels.nn.sparse.SparseLinear` in place and
    freeze everything but the delta values. Returns ``model``.

    ``selection="gradient"`` needs ``calibration`` batches (see :func:`select_by_gradient` for their form
    and ``loss_fn``). Raises ValueError — with the model unchanged — for bad targets, a model that already
    has sparse layers, or a missing calibration set; a failure during calibration restores the model.
    """
    if not isinstance(cfg, SparseConfig):
        raise TypeError(f"cfg must be a SparseConfig, got {type(cfg).__name__}")
    if any(True for _ in sparse_layers(model)):
        raise ValueError("the model already has sparse deltas (SparseLinear layers): merge_and_unload or reload "
                         "the base first")
    if cfg.selection == "gradient" and calibration is None:
        raise ValueError("selection='gradient' needs calibration batches: apply(model, cfg, calibration=[...])")
    targets = resolve_targets(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    chosen = {name: select_positions(model.get_submodule(name), cfg, gen) for name in targets}
    new = {name: SparseLinear(model.get_submodule(name), idx, block_size=cfg.block_size)
           for name, idx in chosen.items()}
    for name, layer in new.items():
        parent, child = get_parent(model, name)
        setattr(parent, child, layer)
    setattr(model, CONFIG_ATTR, cfg)
    _freeze_base(model)
    if cfg.selection == "gradient":
        try:
            select_by_gradient(model, calibration, loss_fn=loss_fn)
        except BaseException:
            _restore(model, new, grad_flags)
            raise
    return model


def _restore(model: nn.Module, layers: dict[str, SparseLinear], grad_flags: dict) -> None:
    """Undo :func:`apply` (put the bases back, restore requires_grad flags)."""
    for name, layer in layers.items():
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.base_layer)
    for p, flag in grad_flags.items():
        p.requires_grad_(flag)
    if CONFIG_ATTR in model.__dict__:
        delattr(model, CONFIG_ATTR)


# ================================================================== gradient selection
def _batch_loss(model: nn.Module, batch, loss_fn: Optional[Callable]) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, dict):
        loss = model(**batch).loss
    elif isinstance(batch, torch.Tensor):
        loss = model(input_ids=batch, labels=batch).loss
    else:
        raise TypeError(f"calibration batches must be dicts of model inputs (with labels) or input_ids tensors, "
                        f"or pass loss_fn(model, batch); got {type(batch).__name__}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the calibration loss must be a scalar tensor, got {type(loss).__name__}")
    return loss


def _permuted(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """New tensor shaped like ``t``: row i is t[src[i]] where src[i] >= 0, else zero."""
    out = torch.zeros_like(t)
    keep = src >= 0
    out[keep] = t[src[keep].to(t.device)]
    return out


def _placement(old_idx: torch.Tensor, new_idx: torch.Tensor) -> torch.Tensor:
    """For each new (sorted) position, its slot in the sorted ``old_idx``, or -1 when it is new."""
    pos = torch.searchsorted(old_idx, new_idx).clamp(max=old_idx.numel() - 1)
    return torch.where(old_idx[pos] == new_idx, pos, torch.full_like(pos, -1))


@torch.no_grad()
def _write_selection(layer: SparseLinear, new_idx: torch.Tensor, optimizer=None) -> torch.Tensor:
    """Replace the layer's selection by sorted ``new_idx`` (same nnz): surviving positions keep their value,
    ``.grad`` and optimizer state; new ones start at zero. Returns the placement (old slot or -1)."""
    p = layer.delta_values
    src = _placement(layer.delta_indices, new_idx.to(layer.delta_indices.device))
    vals = _permuted(p.detach(), src)
    grad = None if p.grad is None else _permuted(p.grad, src)
    layer.set_delta_(new_idx, vals)
    if grad is not None:
        p.grad = grad
    if optimizer is not None:
        for t in optimizer.state.get(p, {}).values():
            if isinstance(t, torch.Tensor) and t.shape == p.shape:
                t.copy_(_permuted(t, src))
    return src


def select_by_gradient(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None,
                       candidate_multiplier: Optional[float] = None, seed: Optional[int] = None) -> None:
    """Re-select every sparse layer's positions by accumulated gradient magnitude over ``batches``.

    Each batch is a dict of model inputs whose output has ``.loss`` (labels included), an ``input_ids``
    tensor (causal LM loss on itself), or anything ``loss_fn(model, batch) -> scalar`` accepts. Per layer,
    the current selection plus ``ceil(candidate_multiplier * nnz) - nnz`` random unselected candidates are
    scored: the selection by ``delta_values.grad``, the candidates by the ops' grow hook. The nnz positions
    of largest |Σ grad| (tiles: Frobenius norm) become the selection; positions kept keep their values, new
    ones start at zero. Call it before creating the optimizer (optimizer state is not permuted here).
    Parameters' ``.grad`` are restored afterwards; no dense gradient is ever formed.
    """
    cfg = get_config(model) or SparseConfig()
    mult = cfg.candidate_multiplier if candidate_multiplier is None else candidate_multiplier
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult >= 1.0:
        raise ValueError(f"candidate_multiplier must be >= 1, got {mult!r}")
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("the model has no sparse layers: apply(model, SparseConfig(...)) first")
    batches = list(batches)
    if not batches:
        raise ValueError("select_by_gradient needs at least one calibration batch")
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    saved_grads = {p: p.grad for p in model.parameters() if p.requires_grad}
    try:
        for _, layer in layers:
            if layer.merged:
                raise ValueError("cannot re-select a merged sparse layer")
            total = num_positions(layer.out_features, layer.in_features, layer.block_size)
            extra = min(total, math.ceil(mult * layer.nnz)) - layer.nnz
            cand = sample_positions(total, extra, layer.delta_indices, gen)
            if cand.numel():
                layer.set_grow_candidates_(cand)
            layer.delta_values.grad = None
            layer.delta_values.requires_grad_(True)
        for batch in batches:
            _batch_loss(model, batch, loss_fn).backward()
        for _, layer in layers:
            g = layer.delta_values.grad
            g = torch.zeros_like(layer.delta_values) if g is None else g
            pos, score = layer.delta_indices, position_scores(g, layer.block_size)
            if layer.grow_indices is not None:
                pos = torch.cat([pos, layer.grow_indices])
                score = torch.cat([score, position_scores(layer.grow_scores, layer.block_size)])
            top = score.topk(layer.nnz).indices
            layer.delta_values.grad = None
            _write_selection(layer, pos[top].sort().values)
    finally:
        for _, layer in layers:
            layer.clear_grow_candidates_()
        for p, g in saved_grads.items():
            p.grad = g


# ================================================================== drop-and-grow
class DropAndGrow:
    """SpIEL-style drop-and-grow for a model after :func:`apply` (rule in the module docstring).

    Args:
        model: the sparse model. optimizer: the optimizer stepping its delta values (each must be in it).
        cfg: defaults to the config recorded on the model; ``regrow_every`` must be set.

    Call :meth:`step` once after every ``optimizer.step()``; every ``regrow_every``-th call regrows and
    returns {layer name: number of positions changed}; other calls return None. While it lives, every
    layer scores its current candidate set on each backward (one more sampled product per layer).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Optional[SparseConfig] = None):
        cfg = cfg or get_config(model)
        if cfg is None:
            raise ValueError("the model has no sparse config: apply(model, SparseConfig(...)) first, or pass cfg")
        if cfg.regrow_every is None:
            raise ValueError("DropAndGrow needs cfg.regrow_every (a positive number of steps)")
        self.layers = list(sparse_layers(model))
        if not self.layers:
            raise ValueError("the model has no sparse layers: apply(model, SparseConfig(...)) first")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, layer in self.layers if id(layer.delta_values) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the delta values of {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}; build it over trainable(model)")
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.steps = 0
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self._draw_candidates()

    def _n_change(self, layer: SparseLinear) -> int:
        total = num_positions(layer.out_features, layer.in_features, layer.block_size)
        return min(math.floor(self.cfg.regrow_fraction * layer.nnz), total - layer.nnz)

    def _draw_candidates(self) -> None:
        for _, layer in self.layers:
            d = self._n_change(layer)
            if d <= 0:
                layer.clear_grow_candidates_()
                continue
            total = num_positions(layer.out_features, layer.in_features, layer.block_size)
            cand = sample_positions(total, max(d, math.ceil(self.cfg.candidate_multiplier * d)),
                                    layer.delta_indices, self.gen)
            layer.set_grow_candidates_(cand)

    def step(self) -> Optional[dict[str, int]]:
        self.steps += 1
        if self.steps % self.cfg.regrow_every:
            return None
        return self.regrow()

    @torch.no_grad()
    def regrow(self) -> dict[str, int]:
        """Drop and grow now (all layers); returns {name: positions changed}."""
        changed = {}
        for name, layer in self.layers:
            d = self._n_change(layer)
            if d <= 0 or layer.grow_indices is None:
                changed[name] = 0
                continue
            b = layer.block_size
            keep = torch.ones(layer.nnz, dtype=torch.bool, device=layer.delta_indices.device)
            keep[position_scores(layer.delta_values, b).topk(d, largest=False).indices] = False
            grown = layer.grow_indices[position_scores(layer.grow_scores, b).topk(d).indices]
            new_idx = torch.cat([layer.delta_indices[keep], grown]).sort().values
            _write_selection(layer, new_idx, self.optimizer)
            changed[name] = d
        self._draw_candidates()
        return changed

    def close(self) -> None:
        """Stop scoring candidates (no more grow-hook work in backward)."""
        for _, layer in self.layers:
            layer.clear_grow_candidates_()


# ================================================================== merge / report
def merge_and_unload(model: nn.Module, mode: str = "exact", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Merge every delta into its base and put the bases back in place of the SparseLinear wrappers.

    Dense bases merge exactly (``mode`` is irrelevant there). 4-bit bases need ``mode="requantize"`` (stays
    4-bit, one more rounding) or ``mode="dequantize"`` (an ``nn.Linear`` in ``dtype`` holding
    ``dequant(W4) + Δ``). Checked for every layer before any is merged. Returns ``model``.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    layers = list(sparse_layers(model))
    if mode == "exact" and any(layer._kind == "4bit" and not layer.merged for _, layer in layers):
        raise ValueError("the model has 4-bit base layers: pass mode='dequantize' (16-bit result, exactly what "
                         "was trained) or mode='requantize' (stays 4-bit, one more rounding)")
    for name, layer in layers:
        layer.clear_grow_candidates_()
        layer.merge(mode=mode, dtype=dtype)
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.unwrap())
    if CONFIG_ATTR in model.__dict__:
        delattr(model, CONFIG_ATTR)
    return model


def sparse_report(model: nn.Module) -> dict:
    """Trainable-parameter report: ``trainable``/``total`` (PEFT's counting, see ``_common``), and per layer
    its shape, block_size, nnz (positions), trainable values and the weight entries they reach."""
    t, a = trainable_parameters(model)
    layers = {}
    for name, layer in sparse_layers(model):
        layers[name] = {"shape": [layer.out_features, layer.in_features], "block_size": layer.block_size,
                        "nnz": layer.nnz, "values": layer.delta_values.numel(), "entries": layer.num_entries,
                        "density": layer.density}
    return {"trainable": t, "total": a, "trainable_percent": 100.0 * t / a if a else 0.0,
            "delta_entries": sum(v["entries"] for v in layers.values()), "layers": layers}


# ================================================================== files
def save_sparse(model: nn.Module, directory) -> None:
    """Write the deltas: ``adapter_config.json`` (peft_type SPARSE, config fields, ``modules``, fingerprint)
    and ``adapter_model.safetensors`` (``<module>.delta_indices`` int64, ``<module>.delta_values``)."""
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("the model has no sparse layers to save")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:4]} have their delta merged into the base; unmerge before saving")
    cfg = get_config(model) or SparseConfig(block_size=layers[0][1].block_size)
    config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, **cfg.to_dict(),
              "modules": {n: {"shape": [layer.out_features, layer.in_features], "block_size": layer.block_size,
                              "nnz": layer.nnz} for n, layer in layers},
              FINGERPRINT_KEY: model_fingerprint(model)}
    tensors = {}
    for n, layer in layers:
        tensors[f"{n}.delta_indices"] = layer.delta_indices
        tensors[f"{n}.delta_values"] = layer.delta_values.detach()
    write_method_files(directory, config, tensors)


def _load_error(directory, msg: str) -> AdapterLoadError:
    return AdapterLoadError(f"{directory}: {msg}")


def load_sparse(model: nn.Module, directory) -> nn.Module:
    """Load deltas saved by :func:`save_sparse` into ``model`` and return it.

    A model without sparse layers gets the file's modules wrapped (frozen base, trainable values); a model
    with sparse layers must have exactly the file's modules, and their selections and values are replaced in
    place. Everything (peft_type, fingerprint, module names and shapes, block sizes, tensor keys, dtypes,
    index range/order/uniqueness, value shapes, finiteness) is checked before the model is touched, so a
    failed load leaves it unchanged.
    """
    config, tensors = read_method_files(directory)
    check_peft_type(config, PEFT_TYPE, directory)
    check_fingerprint(config, model, directory)
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _load_error(directory, f"format_version {version!r} is newer than this reader ({FORMAT_VERSION}); "
                                     f"upgrade peft_kernels")
    try:
        cfg = SparseConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise _load_error(directory, f"invalid sparse config: {e}") from None
    mods = config.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise _load_error(directory, "config has no 'modules' object naming the sparse layers")
    expected = {f"{n}.{s}" for n in mods for s in ("delta_indices", "delta_values")}
    if set(tensors) != expected:
        miss, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise _load_error(directory, f"tensor keys do not match the config's modules (missing {miss[:4]}, "
                                     f"unexpected {extra[:4]})")
    existing = dict(sparse_layers(model))
    if existing and set(existing) != set(mods):
        raise _load_error(directory, f"the model's sparse layers differ from the file's: only in the model "
                                     f"{sorted(set(existing) - set(mods))[:4]}, only in the file "
                                     f"{sorted(set(mods) - set(existing))[:4]}")
    plan = []
    for name, meta in mods.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise _load_error(directory, f"module {name!r} does not exist in {type(model).__name__}") from None
        if not isinstance(m, SparseLinear) and not is_linear(m):
            raise _load_error(directory, f"module {name!r} is a {type(m).__name__}, not a linear layer")
        n, k = SparseLinear._shape(m.base_layer if isinstance(m, SparseLinear) else m)
        if not isinstance(meta, dict) or list(meta.get("shape", [])) != [n, k]:
            raise _load_error(directory, f"module {name!r} is [{n}, {k}] in the model but the file records "
                                         f"{meta.get('shape') if isinstance(meta, dict) else meta!r}")
        b = meta.get("block_size")
        try:
            check_block_size(b)
        except ValueError as e:
            raise _load_error(directory, f"module {name!r}: {e}") from None
        if isinstance(m, SparseLinear):
            if m.block_size != b:
                raise _load_error(directory, f"module {name!r} has block_size {m.block_size} in the model, "
                                             f"{b} in the file")
            if m.merged:
                raise _load_error(directory, f"module {name!r} has its delta merged; unmerge before loading")
        idx, vals = tensors[f"{name}.delta_indices"], tensors[f"{name}.delta_values"]
        try:
            check_indices(idx, n, k, b, what=f"{name}.delta_indices")
            if meta.get("nnz", idx.numel()) != idx.numel():
                raise ValueError(f"{name}: the config records nnz={meta.get('nnz')!r} but the file holds "
                                 f"{idx.numel()} indices")
            if not vals.is_floating_point():
                raise TypeError(f"{name}.delta_values must be a float tensor, got {vals.dtype}")
            if tuple(vals.shape) != values_shape(idx.numel(), b):
                raise ValueError(f"{name}.delta_values has shape {tuple(vals.shape)}, expected "
                                 f"{values_shape(idx.numel(), b)}")
            if not torch.isfinite(vals).all():
                raise ValueError(f"{name}.delta_values contains NaN or Inf")
        except (TypeError, ValueError) as e:
            raise _load_error(directory, str(e)) from None
        plan.append((name, m, idx, vals, b))
    # Everything checked: now change the model.
    for name, m, idx, vals, b in plan:
        if isinstance(m, SparseLinear):
            m.set_delta_(idx, vals)
        else:
            parent, child = get_parent(model, name)
            setattr(parent, child, SparseLinear(m, idx, vals, block_size=b, dtype=vals.dtype))
    setattr(model, CONFIG_ATTR, cfg)
    _freeze_base(model)
    return model
