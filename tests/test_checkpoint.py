"""save_quantized / load_quantized: byte-exact round trips, bitsandbytes and dense checkpoints, streaming
memory, atomic writes, and refusal of bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _tiny_models import ARCHS, build, model_class, sample_ids, tiny_config
from peft_kernels.nn import Linear4bit
from peft_kernels.quant import checkpoint as ckpt_mod
from peft_kernels.quant.checkpoint import CheckpointError, load_quantized, save_quantized
from peft_kernels.quant.model import quantize_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[1]


def _quantized(arch, **kw):
    model = build(arch, **kw)
    quantize_model(model)
    return model


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _no_meta(model):
    return not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _rewrite(path: Path, edit):
    tensors = safetensors_torch.load_file(str(path))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _snapshot(directory: Path):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_byte_exact(arch, tmp_path):
    model = _quantized(arch)
    out = tmp_path / "ckpt"
    save_quantized(model, out, max_shard_bytes=30_000)

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files and "config.json" in files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        stored.update({k: shard for k in safetensors_torch.load_file(str(out / shard))})
    assert index["weight_map"] == stored
    stored_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) - _tied_bytes(model)
    assert index["metadata"]["total_size"] == stored_bytes
    for key, shard in stored.items():  # a 4-bit weight and its statistics share a shard
        if ".weight." in key:
            assert stored[key.split(".weight.")[0] + ".weight"] == shard
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"

    loaded = load_quantized(out, model_cls=model_class(arch))
    assert _no_meta(loaded) and not loaded.training
    _assert_same_state(model, loaded)
    fresh = build(arch)  # non-persistent buffers (rotary inv_freq, position_ids) recomputed right
    for name, buf in fresh.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buf), name
    if arch == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    if arch == "bert":
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _tied_bytes(model):
    """Bytes of state-dict entries that alias an earlier one (stored once)."""
    seen, dup = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            dup += t.numel() * t.element_size()
        seen.add(key)
    return dup


def test_single_file_and_other_settings(tmp_path):
    model = build("qwen2")
    quantize_model(model, quant_type="fp4", blocksize=128, double_quant=False, compute_dtype=torch.bfloat16)
    save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_quantized(tmp_path / "q")
    _assert_same_state(model, loaded)
    layer = loaded.model.layers[0].mlp.up_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant, layer.compute_dtype) == \
        ("fp4", 128, False, torch.bfloat16)
    loaded = load_quantized(tmp_path / "q/model.safetensors", config=model.config)  # a file, explicit config
    _assert_same_state(model, loaded)


def _bnb_llama_checkpoint(directory: Path):
    """A Llama checkpoint quantized by bitsandbytes itself and written by transformers' save_pretrained.

    transformers' own BitsAndBytesConfig loading path needs accelerate (absent here), so the layers are
    swapped by hand for ``bitsandbytes.nn.Linear4bit`` quantized on CPU (Params4bit), exactly what that
    path builds; no forward runs through them (bnb 0.50.2 repacks weights after an eval-mode CPU forward).
    """
    bnb = pytest.importorskip("bitsandbytes")
    model = build("llama")
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]:
        dense = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
        layer = layer.to("cpu")
        assert layer.weight.bnb_quantized
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.config.quantization_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    model.save_pretrained(directory)


def test_bitsandbytes_checkpoint_loads_byte_exact(tmp_path):
    _bnb_llama_checkpoint(tmp_path / "bnb")
    on_disk = safetensors_torch.load_file(str(tmp_path / "bnb/model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in on_disk
    loaded = load_quantized(tmp_path / "bnb")
    assert _no_meta(loaded)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Linear4bit) and isinstance(loaded.lm_head, nn.Linear)
    state = loaded.state_dict()
    assert state.keys() == on_disk.keys()
    for k, t in on_disk.items():
        if ".quant_state." in k:  # JSON: same content, key order may differ
            assert json.loads(bytes(state[k].tolist())) == json.loads(bytes(t.tolist())), k
        else:
            assert torch.equal(state[k], t), k
    # Our quantizer gives the same bytes for the same weights, hence the same model.
    ours = _quantized("llama")
    for name, layer in ours.named_modules():
        if isinstance(layer, Linear4bit):
            other = loaded.get_submodule(name)
            assert torch.equal(layer.weight, other.weight) and torch.equal(layer.absmax, other.absmax), name
            assert torch.equal(layer.nested_absmax, other.nested_absmax)
            assert layer.nested_offset == other.nested_offset
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)
    assert loaded.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32  # from the bnb config

    # Saving it again writes what transformers + bitsandbytes wrote.
    save_quantized(loaded, tmp_path / "again")
    again = safetensors_torch.load_file(str(tmp_path / "again/model.safetensors"))
    assert again.keys() == on_disk.keys()
    for k, t in on_disk.items():
        if ".quant_state." not in k:
            assert torch.equal(again[k], t), k


def test_dense_sharded_fp16_checkpoint_streams_into_4bit(tmp_path):
    dense = build("llama", dtype=torch.float16)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="60KB")
    shards = list((tmp_path / "dense").glob("model-*.safetensors"))
    assert len(shards) >= 3

    loaded = load_quantized(tmp_path / "dense")
    reference = _quantized("llama", dtype=torch.float16)
    assert _no_meta(loaded)
    _assert_same_state(reference, loaded)
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit) and layer.weight_dtype == torch.float16
    assert loaded.model.embed_tokens.weight.dtype == torch.float16 and isinstance(loaded.lm_head, nn.Linear)
    qc = loaded.config.quantization_config
    assert qc["load_in_4bit"] and qc["llm_int8_skip_modules"] == ["lm_head"]

    as_fp32 = load_quantized(tmp_path / "dense", dtype=torch.float32, quant_type="fp4", blocksize=128,
                             double_quant=False, target_modules=["mlp"])
    assert as_fp32.model.embed_tokens.weight.dtype == torch.float32
    mlp = as_fp32.model.layers[1].mlp.up_proj
    assert (mlp.quant_type, mlp.blocksize, mlp.double_quant) == ("fp4", 128, False)
    assert isinstance(as_fp32.model.layers[1].self_attn.q_proj, nn.Linear)
    with torch.no_grad():
        ref = dense.float()(ids).logits
        out = as_fp32(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.25


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_dense_checkpoint_with_conv1d_or_tied_head(arch, tmp_path):
    build(arch).save_pretrained(tmp_path / "dense")
    loaded = load_quantized(tmp_path / "dense", model_cls=model_class(arch))
    _assert_same_state(_quantized(arch), loaded)
    if arch == "gpt2":  # Conv1D weights are stored [in, out] and must be transposed before quantizing
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    else:
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("shape,blocksize,quant_type,double_quant", [
    ((257, 129), 64, "nf4", True),  # odd element count, partial last block, several chunks
    ((96, 200), 128, "fp4", False),
    ((3, 5), 32, "nf4", True),  # smaller than one chunk
])
def test_chunked_quantization_is_byte_identical(shape, blocksize, quant_type, double_quant):
    from peft_kernels.quant import quantize_4bit
    w = torch.randn(shape, dtype=torch.float16)
    p1, s1 = quantize_4bit(w, blocksize, quant_type, double_quant)
    p2, s2 = quantize_4bit(w, blocksize, quant_type, double_quant, chunk_elements=1000)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    assert (s1.shape, s1.dtype, s1.blocksize, s1.quant_type) == (s2.shape, s2.dtype, s2.blocksize, s2.quant_type)
    if double_quant:
        assert torch.equal(s1.nested.absmax, s2.nested.absmax) and s1.nested.offset == s2.nested.offset
    else:
        assert s2.nested is None


# ---------------------------------------------------------------------- memory
def _write_big_dense_checkpoint(path: Path):
    """Llama with 4 layers of 7 [2048, 2048] projections in fp16: 224 MiB of weights, 8 MiB per projection."""
    cfg = tiny_config("llama", hidden_size=2048, intermediate_size=2048, num_attention_heads=16,
                      num_key_value_heads=16, num_hidden_layers=4, vocab_size=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # big element-wise ops are faster single-threaded on the 2-core CI box
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
        model.save_pretrained(path, max_shard_size="60MB")
    finally:
        torch.set_num_threads(threads)
    return sum(p.numel() * p.element_size() for p in model.parameters()), 2048 * 2048 * 2


def test_streaming_load_peak_memory_is_one_layer_plus_the_4bit_model(tmp_path):
    """Peak RSS growth while loading <= 4-bit model + 2 x largest dense tensor + 64 MiB, far below 16-bit.

    The 2 x layer term covers the memory-mapped 16-bit source pages of the layer being quantized plus its
    float32 working copy chunk; the 64 MiB covers the quantization temporaries of one chunk, safetensors'
    read-ahead window and allocator slack.
    """
    dense_bytes, largest = _write_big_dense_checkpoint(tmp_path / "big")
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) >= 3
    build("llama", dtype=torch.float16).save_pretrained(tmp_path / "warmup")
    # One thread: on the 2-core CI box, multi-threaded element-wise ops are several times slower.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "tests/_load_peak_rss.py"), str(tmp_path / "big"),
                               str(tmp_path / "warmup")], capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(tmp_path / "big")  # 225 MiB: do not leave it in pytest's kept temp dirs
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = res["peak"] - res["base"]
    allowance = res["model_bytes"] + 2 * largest + 64 * 2**20
    mib = 2**20
    print(f"\npeak RSS growth {growth / mib:.1f} MiB; 4-bit model {res['model_bytes'] / mib:.1f} MiB; "
          f"bound {allowance / mib:.1f} MiB; 16-bit weights {dense_bytes / mib:.1f} MiB; "
          f"hwm reset: {res['hwm_reset']}")
    assert growth <= allowance
    assert growth < 0.65 * dense_bytes


# ------------------------------------------------------------------ atomic save
def test_save_refuses_to_clobber_and_replaces_atomically(tmp_path):
    out = tmp_path / "ckpt"
    model = _quantized("llama")
    save_quantized(model, out, max_shard_bytes=30_000)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, out)
    assert _snapshot(out) == before

    (out / "tokenizer.json").write_text("{}")
    other = _quantized("llama", seed=1)
    save_quantized(other, out, overwrite=True)  # 1 file now: the old shards must not linger
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    _assert_same_state(other, load_quantized(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_replace_without_atomic_exchange_and_through_a_symlink(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_rename_exchange", lambda a, b: False)  # e.g. not Linux
    real = tmp_path / "real"
    save_quantized(_quantized("llama"), real, max_shard_bytes=30_000)
    (tmp_path / "link").symlink_to(real)
    other = _quantized("llama", seed=1)
    save_quantized(other, tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_state(other, load_quantized(tmp_path / "link"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_failed_save_leaves_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    model = _quantized("llama")
    save_quantized(model, out)
    before = _snapshot(out)
    calls = []
    real = ckpt_mod.save_file

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half")
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out, max_shard_bytes=30_000, overwrite=True)
    assert _snapshot(out) == before
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_quantized(model, tmp_path / "new", max_shard_bytes=30_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------- bad input
def test_refuses_missing_and_pickle_checkpoints(tmp_path, monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("a pickle file was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        load_quantized(tmp_path / "empty")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    build("llama").config.save_pretrained(legacy)
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle.*refusing"):
        load_quantized(legacy)
    with pytest.raises(CheckpointError, match="pickle-based checkpoint: refusing"):
        load_quantized([legacy / "pytorch_model.bin"], config=build("llama").config)
    (legacy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match="pickle-based checkpoint: refusing"):
        load_quantized(legacy)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_quantized(tmp_path / "model.safetensors", config=build("llama").config)


@pytest.fixture
def saved_llama(tmp_path):
    model = _quantized("llama")
    save_quantized(model, tmp_path / "q")
    return tmp_path / "q", model


def test_wrong_architecture_or_shape_is_named(saved_llama, tmp_path):
    path, _ = saved_llama
    narrow = tiny_config("llama", hidden_size=32)
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight in model\.safetensors has shape \(128, 64\) "
                                              r"but LlamaForCausalLM expects \(128, 32\)"):
        load_quantized(path, config=narrow)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight .*quant state is for a "
                                              r"\(64, 128\) weight but this layer is \[64, 96\]"):
        load_quantized(path, config=tiny_config("llama", intermediate_size=96))
    with pytest.raises(CheckpointError, match="no place in GPT2LMHeadModel|not a linear|no such module"):
        load_quantized(path, config=tiny_config("gpt2"))

    build("llama").save_pretrained(tmp_path / "dense")  # dense path: the shape check before quantizing
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight in model\.safetensors "
                                              r"has shape \(64, 128\) but LlamaForCausalLM expects \(64, 96\)"):
        load_quantized(tmp_path / "dense", config=tiny_config("llama", intermediate_size=96))


def test_missing_tensors_are_listed(saved_llama):
    path, _ = saved_llama
    _rewrite(path / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors .*\['model\.norm\.weight'\]"):
        load_quantized(path)


@pytest.mark.parametrize("damage", ["json", "absmax_len", "absmax_gone", "state_gone", "bytes_len"])
def test_corrupt_quant_state_is_rejected(saved_llama, damage):
    path, _ = saved_llama
    w = "model.layers.1.self_attn.v_proj.weight"
    qs = f"{w}.quant_state.bitsandbytes__nf4"

    def edit(t):
        if damage == "json":
            t[qs] = torch.tensor(list(b'{"quant_type": "nf4", "blocksi'), dtype=torch.uint8)
        elif damage == "absmax_len":
            t[f"{w}.absmax"] = t[f"{w}.absmax"][:-1].clone()
        elif damage == "absmax_gone":
            t.pop(f"{w}.absmax")
        elif damage == "state_gone":
            t.pop(qs)
        else:
            t[w] = t[w][:-3].clone()

    _rewrite(path / "model.safetensors", edit)
    expected = {"json": "corrupt quant state JSON", "absmax_len": "absmax has", "absmax_gone": "lacks tensor",
                "state_gone": "looks like packed 4-bit bytes", "bytes_len": "packed weight has"}[damage]
    with pytest.raises(CheckpointError, match=expected) as info:
        load_quantized(path)
    assert "v_proj" in str(info.value)


def test_settings_that_cannot_apply_to_a_4bit_checkpoint(saved_llama):
    path, model = saved_llama
    with pytest.raises(ValueError, match="apply to dense checkpoints only"):
        load_quantized(path, skip_modules=["q_proj"])
    with pytest.raises(ValueError, match="loaded as stored"):
        load_quantized(path, quant_type="fp4")
    _assert_same_state(model, load_quantized(path, quant_type="nf4", blocksize=64))  # agreeing is fine
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="only bitsandbytes 4-bit"):
        load_quantized(path)


def test_base_model_checkpoints_and_heads_map_by_prefix(tmp_path):
    # GPT2Model keys ("h.0.attn.c_attn.weight") load into GPT2LMHeadModel ("transformer.h.0...").
    build("gpt2").transformer.save_pretrained(tmp_path / "base")
    loaded = load_quantized(tmp_path / "base")
    _assert_same_state(_quantized("gpt2"), loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight

    # The other way: a causal-LM checkpoint into the bare LlamaModel; the head is skipped with a warning.
    save_quantized(_quantized("llama"), tmp_path / "lm")
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors have no place in LlamaModel.*lm_head\.weight"):
        base = load_quantized(tmp_path / "lm", model_cls=transformers.AutoModel)
    _assert_same_state(_quantized("llama").model, base)
    with pytest.raises(CheckpointError, match="no place in LlamaModel"):
        load_quantized(tmp_path / "lm", model_cls=transformers.AutoModel, strict=True)
