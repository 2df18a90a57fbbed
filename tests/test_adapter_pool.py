"""AdapterPool (serving/pool.py): mixed-adapter batches over a tiny 4-bit Llama, hot swap, eviction, errors.

* A mixed batch equals, sequence by sequence and bit for bit (torch.equal, fp32, CPU path), the model with
  that sequence's adapter loaded alone by ``io.load_adapter`` (LoraLinear) — or the plain 4-bit model for
  sequences that name no adapter. Adapters of ranks 4 / 8 / 16, one covering only q_proj/v_proj.
* Loading, unloading, evicting and switching adapters after the first torch.compile causes no recompile
  (counted with a compile backend that counts the graphs it is handed).
"""
import copy

import pytest
import torch
from _tiny_models import build, sample_ids
from _tolerance import assert_close_to_reference

from peft_kernels.io import load_adapter, save_adapter
from peft_kernels.methods import lora
from peft_kernels.quant import quantize_model
from peft_kernels.serving import AdapterPool, PoolFullError, generate, mixed_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (r, alpha, target_modules, rank_pattern)
ADAPTERS = {
    "r4": (4, 8, "all-linear", {}),
    "r8": (8, 16, "all-linear", {"down_proj": 2}),
    "r16": (16, 16, ["q_proj", "v_proj"], {}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = build("llama")
    quantize_model(base)
    base.eval()
    dirs = {}
    for i, (name, (r, alpha, targets, rp)) in enumerate(ADAPTERS.items()):
        m = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        lora.apply(m, lora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, rank_pattern=rp,
                                      init_lora_weights=False))
        d = tmp_path_factory.mktemp(name)
        save_adapter(m, d)
        dirs[name] = d
    return base, dirs


@pytest.fixture
def pool_model(setup):
    base, dirs = setup
    m = copy.deepcopy(base)
    pool = AdapterPool(m, slots=3, max_rank=16)
    for name in ADAPTERS:
        pool.load(name, dirs[name])
    return m, pool


def _single(setup, name):
    base, dirs = setup
    m = copy.deepcopy(base)
    if name is not None:
        load_adapter(m, dirs[name])
    return m


@torch.no_grad()
def test_mixed_batch_equals_single_adapter_runs(setup, pool_model):
    model, pool = pool_model
    names = ["r8", None, "r4", "r16", "__base__", "r8"]
    ids = sample_ids(batch=len(names), seq=7)
    with mixed_adapters(model, names):
        got = model(ids).logits
    singles = {n: _single(setup, n)(ids).logits for n in ("r4", "r8", "r16", None)}
    for b, n in enumerate(names):
        want = singles[None if n == "__base__" else n][b]
        assert torch.equal(got[b], want), (b, n)
    # PEFT's spelling, a forward kwarg: the same logits, and the slots are cleared afterwards.
    assert torch.equal(model(ids, adapter_names=names).logits, got)
    assert all(layer.slot_index is None for layer in pool.layers.values())
    assert torch.equal(model(ids).logits, singles[None])
    # Different adapters really differ (the comparison above is not vacuous).
    assert not torch.equal(singles["r4"][0], singles[None][0]) and not torch.equal(singles["r16"][0], singles[None][0])


@torch.no_grad()
def test_generate_per_sequence(setup, pool_model):
    model, _ = pool_model
    ids = sample_ids(batch=3, seq=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = generate(model, ids, adapter_names=["r16", None, "r4"], **kw)
    for b, n in enumerate(["r16", None, "r4"]):
        assert torch.equal(out[b], _single(setup, n).generate(ids[b:b + 1], **kw)[0]), (b, n)


def test_slots_and_eviction(setup, pool_model):
    model, pool = pool_model
    _, dirs = setup
    layer = pool.layers["model.layers.0.mlp.down_proj"]
    a_ptr = layer.lora_A.data_ptr()
    assert pool.loaded == ["r4", "r8", "r16"]
    assert layer.ranks.tolist() == [4, 2, 0]  # rank_pattern; r16 does not cover down_proj
    pool.pin("r4")
    pool.index(["r8"])  # r8 used: r16 is now the least recently used
    slot = pool.load("again", dirs["r4"])
    assert pool.last_evicted == "r16" and slot == 2 and "r16" not in pool
    with pytest.raises(PoolFullError, match="evict=False"):
        pool.load("more", dirs["r4"], evict=False)
    pool.pin("r8")
    pool.pin("again")
    with pytest.raises(PoolFullError, match="pinned adapters only"):
        pool.load("more", dirs["r4"])
    pool.unpin("r8")
    pool.load("more", dirs["r16"])
    assert pool.last_evicted == "r8"
    assert pool.unload("more") == 1 and layer.ranks[1] == 0 and pool.layers["model.layers.0.self_attn.q_proj"].ranks[1] == 0
    assert layer.lora_A.data_ptr() == a_ptr  # in place: never reallocated
    # Slot memory, exactly: 3 slots x r 16 x (K + N) fp32 per layer, + 4 + 4 bytes of scale and rank per slot.
    shapes = [(l.in_features, l.out_features) for l in pool.layers.values()]
    assert pool.slot_bytes == sum(3 * 16 * (k + n) * 4 + 3 * 8 for k, n in shapes)
    assert pool.info("r4")["pinned"] and pool.info("r4")["r"] == 4
    pool.load("r4", dirs["r8"], replace=True)  # overwrite in its own slot
    assert pool.slot_of("r4") == 0 and layer.ranks[0] == 2
    assert pool.remove() is model and not any(type(m).__name__ == "MultiLoraLinear" for m in model.modules())


def test_bad_input(setup, pool_model, tmp_path):
    model, pool = pool_model
    base, dirs = setup
    with pytest.raises(KeyError, match=r"\['nope'\] are not loaded in this pool"):
        with mixed_adapters(model, ["r4", "nope"]):
            pass
    with pytest.raises(KeyError, match="not loaded"):
        pool.unload("nope")
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("r4", dirs["r4"])
    # A failing load into a full pool evicts nothing.
    big = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(32, 64),
           "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match="rank r=32, above the pool's slot size max_rank=16"):
        pool.load("big", ({"peft_type": "LORA", "r": 32, "lora_alpha": 32, "target_modules": ["q_proj"]}, big))
    assert pool.loaded == ["r4", "r8", "r16"] and pool.last_evicted is None
    small = AdapterPool(copy.deepcopy(base), slots=2, max_rank=8)
    with pytest.raises(ValueError, match=r"rank r=16, above the pool's slot size max_rank=8"):
        small.load("big", dirs["r16"])
    assert len(small) == 0 and all(int(l.ranks.abs().sum()) == 0 for l in small.layers.values())
    only_q = AdapterPool(copy.deepcopy(base), slots=1, max_rank=16, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="has no slots in this pool"):
        only_q.load("x", dirs["r16"])  # also targets v_proj
    t = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 63),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=r"must be \(4, 64\) and \(64, 4\)"):
        only_q.load("shape", (cfg, t))
    t_nan = {k: torch.full((4, 64) if "lora_A" in k else (64, 4), float("nan")) for k in t}
    with pytest.raises(ValueError, match="finite float values"):
        only_q.load("nan", (cfg, t_nan))
    with pytest.raises(ValueError, match="DoRA"):
        only_q.load("dora", ({**cfg, "use_dora": True}, t))
    with pytest.raises(FileNotFoundError):
        only_q.load("missing", tmp_path / "none")
    with pytest.raises(ValueError, match="already has an AdapterPool"):
        AdapterPool(model, slots=1, max_rank=4)
    with pytest.raises(ValueError, match="the batch names 2 adapters"), torch.no_grad():
        with mixed_adapters(model, ["r4", "r8"]):
            model(sample_ids(batch=3, seq=4))
    with pytest.raises(ValueError, match="adapter_names has 1 names"):
        generate(model, sample_ids(batch=2, seq=4), adapter_names=["r4"])


def test_hot_swap_under_compile_does_not_recompile(setup, pool_model):
    model, pool = pool_model
    _, dirs = setup
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, backend=counting_backend)
    ids = sample_ids(batch=3, seq=6)
    outs, after_first = [], None
    with torch.no_grad():
        for step in range(5):
            if step == 1:
                pool.load("new", dirs["r16"], evict=True)  # evicts r4
            if step == 2:
                pool.unload("r8")
            if step == 3:
                pool.load("r8", dirs["r8"])
            names = [["r8", None, "r16"], ["new", "r16", None], ["new", None, "new"], ["r8", "r16", "new"],
                     [None, None, None]][step]
            with mixed_adapters(model, names):
                outs.append(compiled(ids).logits)
            if step == 0:
                after_first = (len(graphs), counters["stats"]["unique_graphs"])
            with mixed_adapters(model, names):
                eager = model(ids).logits
            assert torch.equal(outs[-1], eager), step
    assert pool.last_evicted is None and "r4" not in pool
    assert after_first[0] >= 1 and after_first[1] >= 1  # dynamo compiled the model
    # 0 recompiles over 3 loads/unloads (one evicting) and 4 adapter switches after the first compile.
    assert (len(graphs), counters["stats"]["unique_graphs"]) == after_first
    assert not torch.equal(outs[0][0], outs[4][0])  # the adapters did change the output
    torch._dynamo.reset()


@torch.no_grad()
def test_same_semantics_as_peft_adapter_names(setup):
    """PEFT 0.21's own mixed batch (``PeftModel(..., adapter_names=)``, "__base__" = no adapter) over the dense
    model holding dequant(W4) in float64 is the reference for our pool over the 4-bit model (fp32 bound)."""
    peft = pytest.importorskip("peft")
    base, dirs = setup
    dense = build("llama")  # same architecture; its weights become dequant(W4) of the 4-bit base
    for name, mod in base.named_modules():
        if type(mod).__name__ == "Linear4bit":
            dense.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    pm = peft.PeftModel.from_pretrained(dense, str(dirs["r4"]), adapter_name="r4")
    for n in ("r8", "r16"):
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    pm = pm.double().eval()
    names = ["r16", "__base__", "r4", "r8"]
    ids = sample_ids(batch=4, seq=6)
    want = pm(input_ids=ids, adapter_names=names).logits
    model = copy.deepcopy(base)
    pool = AdapterPool(model, slots=4, max_rank=16)
    for n in ADAPTERS:
        pool.load(n, dirs[n])
    got = model(ids, adapter_names=names).logits
    for b, n in enumerate(names):
        assert_close_to_reference(got[b], want[b], torch.float32, f"sequence {b} ({n})")


@torch.no_grad()
def test_from_lora_model(setup):
    """Adapters loaded the usual way (io.load_adapter, several names) move into a pool; same logits, bit for bit."""
    base, dirs = setup
    model = copy.deepcopy(base)
    for n in ADAPTERS:
        load_adapter(model, dirs[n], adapter_name=n)
    pool = AdapterPool.from_lora_model(model)
    assert pool.loaded == list(ADAPTERS) and pool.num_slots == 3 and pool.max_rank == 16
    assert not any(type(m).__name__ == "LoraLinear" for m in model.modules())
    names = ["r16", "r4", None, "r8"]
    ids = sample_ids(batch=4, seq=5)
    got = model(ids, adapter_names=names).logits
    for b, n in enumerate(names):
        assert torch.equal(got[b], _single(setup, n)(ids).logits[b]), (b, n)
    with pytest.raises(ValueError, match="no LoraLinear layers"):
        AdapterPool.from_lora_model(copy.deepcopy(base))
    two = copy.deepcopy(base)
    for n in ADAPTERS:
        load_adapter(two, dirs[n], adapter_name=n)
    with pytest.raises(PoolFullError, match="3 adapters"):
        AdapterPool.from_lora_model(two, slots=2)
    with pytest.raises(ValueError, match="above max_rank=8"):
        AdapterPool.from_lora_model(two, max_rank=8)
