"""Sparse fine-tuning as a method: config, targets, selection strategies, drop-and-grow with optimizer state,
trainable counts, training a tiny llama, merge_and_unload, save/load, bad input."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference
from test_sparse_layer import check_against_reference, dense_delta64
from peft_kernels.io.method_files import CONFIG_NAME, FINGERPRINT_KEY, WEIGHTS_NAME, AdapterLoadError
from peft_kernels.methods import sparse as S
from peft_kernels.methods._common import trainable_parameters
from peft_kernels.nn.linear4bit import Linear4bit
from peft_kernels.nn.sparse import SparseLinear
from peft_kernels.quant import quantize_model


class Toy(nn.Module):
    """proj [20, 24] -> tanh -> head [3, 20]."""

    def __init__(self, k=24, n=20, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(k, n)
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def toy_loss(model, batch):
    x, t = batch
    return (model(x) - t).square().sum()


def toy_batches(k=24, count=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, k, generator=g), torch.randn(4, 3, generator=g)) for _ in range(count)]


def dense_w(base):
    """W [N, K] float32 of a base (dequantized for 4-bit)."""
    if isinstance(base, Linear4bit):
        return base.dequantize(torch.float32)
    return base.weight.detach().float() if isinstance(base, nn.Linear) else base.weight.detach().float().t()


def tile_scores(w, b):
    n, k = w.shape
    gn, gk = -(-n // b), -(-k // b)
    pad = torch.zeros(gn * b, gk * b, dtype=torch.float64)
    pad[:n, :k] = w.double().square()
    return pad.view(gn, b, gk, b).sum(dim=(1, 3)).reshape(-1)


def expected_nnz(layer, density, b):
    total = layer.out_features * layer.in_features if b == 0 else \
        -(-layer.out_features // b) * -(-layer.in_features // b)
    return min(total, max(1, round(density * total)))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, snap):
    sd, types, flags = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def randomize_values(model, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in S.sparse_layers(model):
            layer.delta_values.copy_(torch.randn(layer.delta_values.shape, generator=g) * scale)


# ------------------------------------------------------------------ config and targets
@pytest.mark.parametrize("kwargs,err,match", [
    (dict(density=0.0), ValueError, "density"),
    (dict(density=-0.1), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=float("nan")), ValueError, "density"),
    (dict(density=True), ValueError, "density"),
    (dict(selection="topk"), ValueError, "selection"),
    (dict(block_size=8), ValueError, "block_size"),
    (dict(regrow_every=0), ValueError, "regrow_every"),
    (dict(regrow_fraction=1.0), ValueError, "regrow_fraction"),
    (dict(candidate_multiplier=0.5), ValueError, "candidate_multiplier"),
    (dict(target_modules=[]), TypeError, "target_modules"),
    (dict(exclude_modules=3), TypeError, "exclude_modules"),
])
def test_config_bad_values(kwargs, err, match):
    with pytest.raises(err, match=match):
        S.SparseConfig(**kwargs)


def test_density_one_selects_everything():
    model = Toy()
    S.apply(model, S.SparseConfig(density=1.0, target_modules=["proj"]))
    assert model.proj.nnz == 24 * 20 and model.proj.density == 1.0


@pytest.mark.parametrize("cfg,match", [
    (S.SparseConfig(target_modules=["q_proj", "nope_proj"]),
     r"target_modules names modules that do not exist.*nope_proj"),
    (S.SparseConfig(target_modules=["q_proj"], exclude_modules=["layers.7.self_attn.q_proj"]),
     r"exclude_modules names modules that do not exist"),
    (S.SparseConfig(target_modules=["mlp"]), "not linear layers"),
    (S.SparseConfig(target_modules=r".*\.nothing"), "matched no linear layer"),
    (S.SparseConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), "matched no linear layer"),
])
def test_bad_targets_leave_model_unchanged(cfg, match):
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        S.apply(model, cfg)
    assert_unchanged(model, snap)
    assert S.get_config(model) is None


def test_target_forms():
    model = build("llama")
    names = S.resolve_targets(model, S.SparseConfig())
    assert len(names) == 14 and "lm_head" not in names  # all-linear skips the output head
    assert S.resolve_targets(model, S.SparseConfig(target_modules=["self_attn.q_proj"])) == \
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert S.resolve_targets(model, S.SparseConfig(target_modules=r".*\.1\.mlp\..*_proj")) == \
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert len(S.resolve_targets(model, S.SparseConfig(exclude_modules=["mlp.down_proj"]))) == 12


def test_apply_twice_and_gradient_without_calibration_are_errors():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="calibration"):
        S.apply(model, S.SparseConfig(selection="gradient"))
    assert_unchanged(model, snap)
    S.apply(model, S.SparseConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has sparse"):
        S.apply(model, S.SparseConfig(target_modules=["v_proj"]))


# ------------------------------------------------------------------ selection
@pytest.mark.parametrize("block_size", [0, 16])
def test_random_selection_exact_density_and_seeded(block_size):
    def run(seed):
        m = build("llama")
        S.apply(m, S.SparseConfig(density=0.03, block_size=block_size, seed=seed))
        return m, {n: layer.delta_indices.clone() for n, layer in S.sparse_layers(m)}

    m, a = run(0)
    for name, layer in S.sparse_layers(m):
        idx = layer.delta_indices
        assert idx.numel() == expected_nnz(layer, 0.03, block_size), name
        assert torch.all(idx[1:] > idx[:-1])
    _, again = run(0)
    _, other = run(1)
    assert all(torch.equal(a[n], again[n]) for n in a)
    assert any(not torch.equal(a[n], other[n]) for n in a)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("block_size", [0, 16])
def test_magnitude_selection_picks_top_abs_entries(quantized, block_size, monkeypatch):
    monkeypatch.setattr(S, "_CHUNK_ELEMS", 700)  # several row chunks per layer: exercises the streaming top-k
    model = build("llama")
    if quantized:
        quantize_model(model, blocksize=64)
    bases = {n: model.get_submodule(n) for n in S.resolve_targets(model, S.SparseConfig())}
    S.apply(model, S.SparseConfig(density=0.05, selection="magnitude", block_size=block_size))
    for name, layer in S.sparse_layers(model):
        assert layer.base_layer is bases[name]
        w = dense_w(layer.base_layer)
        score = w.abs().reshape(-1).double() if block_size == 0 else tile_scores(w, block_size)
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[layer.delta_indices] = True
        assert chosen.sum() == expected_nnz(layer, 0.05, block_size)
        # "top-k exactly", robust to ties (4-bit weights repeat values): nothing left out beats anything chosen.
        assert score[chosen].min() >= score[~chosen].max(), name


@pytest.mark.parametrize("block_size", [0, 16])
def test_gradient_selection_picks_largest_accumulated_gradient(block_size):
    batches = toy_batches()
    ref = Toy()
    ref.proj.weight.requires_grad_(True)
    for b in batches:
        toy_loss(ref, b).backward()
    g = ref.proj.weight.grad  # the dense gradient: reference only
    model = Toy()
    cfg = S.SparseConfig(density=0.1, selection="gradient", block_size=block_size, target_modules=["proj"],
                         candidate_multiplier=1000.0)  # every position is scored
    S.apply(model, cfg, calibration=batches, loss_fn=toy_loss)
    layer = model.proj
    score = g.abs().reshape(-1).double() if block_size == 0 else tile_scores(g, block_size)
    chosen = torch.zeros(score.numel(), dtype=torch.bool)
    chosen[layer.delta_indices] = True
    assert chosen.sum() == expected_nnz(layer, 0.1, block_size)
    assert score[chosen].min() > score[~chosen].max()
    assert torch.count_nonzero(layer.delta_values) == 0
    assert layer.delta_values.grad is None and layer.grow_indices is None
    assert layer.delta_values.requires_grad and not model.head.weight.requires_grad


def test_gradient_selection_with_few_candidates_forms_no_dense_gradient():
    tracker = pytest.importorskip("_alloc_tracker", reason="tests/_alloc_tracker.py (sparse-kernels helper) missing")
    model = Toy(k=64, n=48)
    batches = toy_batches(k=64, count=2)
    with tracker.AllocTracker() as tr:
        S.apply(model, S.SparseConfig(density=0.02, selection="gradient", target_modules=["proj"],
                                      candidate_multiplier=4.0), calibration=batches, loss_fn=toy_loss)
    tr.assert_below(64 * 48, what="gradient selection")
    assert model.proj.nnz == round(0.02 * 64 * 48)


def test_failed_calibration_restores_the_model():
    model = Toy()
    snap = snapshot(model)

    def bad_loss(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        S.apply(model, S.SparseConfig(selection="gradient", target_modules=["proj"]), calibration=[0],
                loss_fn=bad_loss)
    assert_unchanged(model, snap)
    assert S.get_config(model) is None


# ------------------------------------------------------------------ trainable counts
@pytest.mark.parametrize("block_size", [0, 16])
def test_trainable_parameter_counts_exact(block_size, capsys):
    model = build("llama")
    shapes = {n: model.get_submodule(n).weight.shape for n in S.resolve_targets(model, S.SparseConfig())}
    base_total = sum(p.numel() for p in model.parameters())
    S.apply(model, S.SparseConfig(density=0.01, block_size=block_size))
    per = {}
    for n, (out_f, in_f) in shapes.items():
        if block_size == 0:
            per[n] = max(1, round(0.01 * out_f * in_f))
        else:
            tiles = math.ceil(out_f / 16) * math.ceil(in_f / 16)
            per[n] = max(1, round(0.01 * tiles)) * 256
    want = sum(per.values())
    assert trainable_parameters(model) == (want, base_total + want)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.delta_values" for n in shapes}
    rep = S.sparse_report(model)
    assert rep["trainable"] == want and {n: v["values"] for n, v in rep["layers"].items()} == per
    S.print_trainable_parameters(model)
    assert f"trainable params: {want:,d} || all params: {base_total + want:,d}" in capsys.readouterr().out


# ------------------------------------------------------------------ drop-and-grow
def _train_step(model, opt, dag, batch):
    opt.zero_grad()
    toy_loss(model, batch).backward()
    opt.step()
    return dag.step()


@pytest.mark.parametrize("block_size", [0, 16])
def test_drop_and_grow_keeps_survivors_state_and_zeroes_grown(block_size):
    model = Toy(k=40, n=36)
    # unstructured: 288 of 1440 entries; block: 4 of the 3x3 tiles (d = 1)
    cfg = S.SparseConfig(density=0.2 if block_size == 0 else 0.5, block_size=block_size, target_modules=["proj"],
                         regrow_every=3,
                         regrow_fraction=0.4, candidate_multiplier=2.0, seed=4)
    S.apply(model, cfg)
    layer = model.proj
    opt = torch.optim.AdamW(S.trainable(model), lr=0.05)
    dag = S.DropAndGrow(model, opt)
    batches = toy_batches(k=40, count=4)
    nnz, d = layer.nnz, math.floor(0.4 * layer.nnz)
    assert d > 0 and layer.grow_indices.numel() == max(d, math.ceil(2.0 * d))
    assert _train_step(model, opt, dag, batches[0]) is None
    assert _train_step(model, opt, dag, batches[1]) is None
    # The third step regrows: capture what it must act on (after that step's optimizer update).
    opt.zero_grad()
    toy_loss(model, batches[2]).backward()
    opt.step()
    st = opt.state[layer.delta_values]
    old = {"idx": layer.delta_indices.clone(), "v": layer.delta_values.detach().clone(),
           "m": st["exp_avg"].clone(), "s": st["exp_avg_sq"].clone(), "step": st["step"].clone()}
    cand, scores = layer.grow_indices.clone(), layer.grow_scores.clone()
    assert torch.count_nonzero(scores) > 0
    mag = S.position_scores(old["v"], block_size)
    dropped = set(old["idx"][mag.topk(d, largest=False).indices].tolist())
    grown = set(cand[S.position_scores(scores, block_size).topk(d).indices].tolist())
    assert max(mag[torch.isin(old["idx"], torch.tensor(sorted(dropped)))]) <= \
        min(mag[~torch.isin(old["idx"], torch.tensor(sorted(dropped)))])
    out = dag.step()
    assert out == {"proj": d}
    new = layer.delta_indices
    assert new.numel() == nnz and torch.all(new[1:] > new[:-1])
    assert set(new.tolist()) == (set(old["idx"].tolist()) - dropped) | grown
    pos_old = {p: i for i, p in enumerate(old["idx"].tolist())}
    st = opt.state[layer.delta_values]
    assert torch.equal(st["step"], old["step"])
    for i, p in enumerate(new.tolist()):
        if p in grown:
            assert not layer.delta_values[i].any() and not st["exp_avg"][i].any() and not st["exp_avg_sq"][i].any()
        else:
            j = pos_old[p]
            assert torch.equal(layer.delta_values[i].detach(), old["v"][j])
            assert torch.equal(st["exp_avg"][i], old["m"][j]) and torch.equal(st["exp_avg_sq"][i], old["s"][j])
    # Fresh candidates, disjoint from the new selection, zero scores.
    assert not torch.isin(layer.grow_indices, new).any() and torch.count_nonzero(layer.grow_scores) == 0
    # The regrown layer still computes x (W + Δ)ᵀ + b and trains.
    check_against_reference(layer, torch.randn(5, 40, requires_grad=True), torch.float32, " after regrow")
    loss0 = toy_loss(model, batches[3]).item()
    for _ in range(3):
        _train_step(model, opt, dag, batches[3])
    assert toy_loss(model, batches[3]).item() < loss0 and layer.nnz == nnz


def test_drop_and_grow_bad_setup():
    model = Toy()
    S.apply(model, S.SparseConfig(target_modules=["proj"]))
    opt = torch.optim.AdamW(S.trainable(model))
    with pytest.raises(ValueError, match="regrow_every"):
        S.DropAndGrow(model, opt)
    S.apply(other := Toy(), S.SparseConfig(target_modules=["proj"], regrow_every=2))
    with pytest.raises(ValueError, match="optimizer does not hold"):
        S.DropAndGrow(other, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="no sparse"):
        S.DropAndGrow(Toy(), opt, S.SparseConfig(regrow_every=2))


# ------------------------------------------------------------------ a tiny transformers model trains
@pytest.mark.parametrize("quantized", [False, True])
def test_tiny_llama_training_lowers_loss(quantized):
    model = build("llama")
    if quantized:
        quantize_model(model, blocksize=64)
    S.apply(model, S.SparseConfig(density=0.05, selection="magnitude", regrow_every=2, regrow_fraction=0.2))
    nnz = {n: layer.nnz for n, layer in S.sparse_layers(model)}
    opt = torch.optim.AdamW(S.trainable(model), lr=1e-2)
    dag = S.DropAndGrow(model, opt)
    ids = sample_ids(2, 12)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        dag.step()
    assert losses[-1] < losses[0] - 0.1, losses
    assert {n: layer.nnz for n, layer in S.sparse_layers(model)} == nnz


# ------------------------------------------------------------------ merge
def test_merge_and_unload_dense_model():
    model = build("llama")
    S.apply(model, S.SparseConfig(density=0.05, block_size=16))
    randomize_values(model)
    ids = sample_ids(2, 10)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    S.merge_and_unload(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules()) and S.get_config(model) is None
    with torch.no_grad():
        y2 = model(input_ids=ids).logits
    assert_close_to_reference(y2, y.double(), torch.float32, "merged logits")


def test_merge_and_unload_4bit_model_both_modes():
    def sparse_4bit():
        m = build("llama")
        quantize_model(m, blocksize=64)
        S.apply(m, S.SparseConfig(density=0.05))
        randomize_values(m)
        return m

    ids = sample_ids(2, 10)
    model = sparse_4bit()
    with torch.no_grad():
        y = model(input_ids=ids).logits
    snap = snapshot(model)
    with pytest.raises(ValueError, match="4-bit"):
        S.merge_and_unload(model)
    assert_unchanged(model, snap)
    S.merge_and_unload(model, mode="dequantize")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear
    with torch.no_grad():
        assert_close_to_reference(model(input_ids=ids).logits, y.double(), torch.float32, "dequantize-merged logits")
    model = sparse_4bit()
    layer = model.model.layers[1].mlp.up_proj
    w_sum = (layer.base_layer.dequantize(torch.float32).double() + dense_delta64(
        layer.delta_indices, layer.delta_values.detach().double(), 0, layer.out_features, layer.in_features)).float()
    want = copy.deepcopy(layer.base_layer)
    want.quantize_(w_sum)
    S.merge_and_unload(model, mode="requantize")
    got = model.model.layers[1].mlp.up_proj
    assert isinstance(got, Linear4bit) and torch.equal(got.weight, want.weight)
    assert torch.equal(got.absmax, want.absmax)


# ------------------------------------------------------------------ files
def _saved(tmp_path, block_size=0):
    model = build("llama")
    S.apply(model, S.SparseConfig(density=0.03, block_size=block_size, target_modules=["q_proj", "down_proj"]))
    randomize_values(model)
    S.save_sparse(model, tmp_path)
    return model


@pytest.mark.parametrize("block_size", [0, 32])
def test_save_load_round_trip(tmp_path, block_size):
    model = _saved(tmp_path, block_size)
    ids = sample_ids(2, 10)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "SPARSE" and cfg["block_size"] == block_size and cfg["density"] == 0.03
    assert cfg[FINGERPRINT_KEY]["hidden_size"] == 64
    assert cfg["modules"]["model.layers.0.mlp.down_proj"]["shape"] == [64, 128]
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert len(tensors) == 8 and tensors["model.layers.1.self_attn.q_proj.delta_indices"].dtype == torch.int64
    # Into a fresh base model: wraps the modules.
    fresh = S.load_sparse(build("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, y)
    assert S.get_config(fresh).block_size == block_size
    assert trainable_parameters(fresh)[0] == trainable_parameters(model)[0]
    # Into a model that already has (other) sparse deltas on the same modules: replaced in place.
    other = build("llama")
    S.apply(other, S.SparseConfig(density=0.01, block_size=block_size, target_modules=["q_proj", "down_proj"],
                                  seed=9))
    S.load_sparse(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, y)


def _tamper_tensor(tmp_path, fn):
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    fn(t)
    save_file(t, str(tmp_path / WEIGHTS_NAME))


def _tamper_config(tmp_path, fn):
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    fn(cfg)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))


KEY = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tamper,match", [
    (lambda p: _tamper_tensor(p, lambda t: t[f"{KEY}.delta_indices"].__setitem__(-1, 64 * 64)), "out of range"),
    (lambda p: _tamper_tensor(p, lambda t: t[f"{KEY}.delta_indices"].__setitem__(1, int(t[f"{KEY}.delta_indices"][0]))),
     "duplicate"),
    (lambda p: _tamper_tensor(p, lambda t: t.__setitem__(f"{KEY}.delta_indices", t[f"{KEY}.delta_indices"].flip(0))),
     "increasing"),
    (lambda p: _tamper_tensor(p, lambda t: t.__setitem__(f"{KEY}.delta_indices", t[f"{KEY}.delta_indices"].int())),
     "int64"),
    (lambda p: _tamper_tensor(p, lambda t: t.__setitem__(f"{KEY}.delta_values", t[f"{KEY}.delta_values"][:-1])),
     "shape"),
    (lambda p: _tamper_tensor(p, lambda t: t[f"{KEY}.delta_values"].__setitem__(0, float("nan"))), "NaN"),
    (lambda p: _tamper_tensor(p, lambda t: t.pop(f"{KEY}.delta_values")), "missing"),
    (lambda p: _tamper_config(p, lambda c: c["modules"].__setitem__("model.layers.5.self_attn.q_proj",
                                                                    c["modules"][KEY])), "do not match|missing"),
    (lambda p: _tamper_config(p, lambda c: c["modules"][KEY].__setitem__("shape", [64, 65])), r"\[64, 64\]"),
    (lambda p: _tamper_config(p, lambda c: c["modules"][KEY].__setitem__("block_size", 8)), "block_size"),
    (lambda p: _tamper_config(p, lambda c: c["modules"][KEY].__setitem__("nnz", 3)), "nnz=3"),
    (lambda p: _tamper_config(p, lambda c: c.__setitem__("format_version", 99)), "format_version"),
    (lambda p: _tamper_config(p, lambda c: c.__setitem__("peft_type", "LORA")), "peft_type"),
    (lambda p: _tamper_config(p, lambda c: c.__setitem__("density", 2.0)), "density"),
    (lambda p: _tamper_config(p, lambda c: c[FINGERPRINT_KEY].__setitem__("hidden_size", 128)), "another model"),
])
@pytest.mark.parametrize("target", ["fresh", "sparse"])
def test_bad_files_are_refused_and_leave_the_model_unchanged(tmp_path, tamper, match, target):
    _saved(tmp_path)
    tamper(tmp_path)
    model = build("llama", seed=1)
    if target == "sparse":
        S.apply(model, S.SparseConfig(density=0.01, target_modules=["q_proj", "down_proj"]))
        randomize_values(model, seed=7)
    snap = snapshot(model)
    with pytest.raises(AdapterLoadError, match=match):
        S.load_sparse(model, tmp_path)
    assert_unchanged(model, snap)


def test_load_module_that_does_not_exist_and_mismatched_layers(tmp_path):
    _saved(tmp_path)
    _tamper_config(tmp_path, lambda c: c["modules"].__setitem__("model.layers.0.self_attn.nope",
                                                                c["modules"].pop(KEY)))
    _tamper_tensor(tmp_path, lambda t: [t.__setitem__(k.replace(KEY, "model.layers.0.self_attn.nope"), t.pop(k))
                                        for k in list(t) if k.startswith(KEY)])
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        S.load_sparse(model, tmp_path)
    assert_unchanged(model, snap)
    # A sparse model whose layers differ from the file's.
    _saved(tmp_path)
    model = build("llama")
    S.apply(model, S.SparseConfig(target_modules=["v_proj"]))
    snap = snapshot(model)
    with pytest.raises(AdapterLoadError, match="differ"):
        S.load_sparse(model, tmp_path)
    assert_unchanged(model, snap)


def test_save_refuses_merged_or_empty(tmp_path):
    with pytest.raises(ValueError, match="no sparse layers"):
        S.save_sparse(Toy(), tmp_path)
    model = Toy()
    S.apply(model, S.SparseConfig(target_modules=["proj"]))
    model.proj.merge()
    with pytest.raises(ValueError, match="merged"):
        S.save_sparse(model, tmp_path)
