"""apply_fused_kernels on tiny transformers models: what is swapped (or kernelized, for RoPE), identical
outputs, identical training."""
import copy
import pickle

import pytest
import torch
from torch import nn

import _tiny_models as tiny
from _tolerance import assert_close_to_reference
from peft_kernels.fused import apply_fused_kernels
from peft_kernels.nn.fused import FusedRMSNorm, FusedSwiGLUMLP

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_swaps_norms_and_mlps_and_keeps_outputs(arch):
    model = tiny.build(arch)
    ids = tiny.sample_ids()
    with torch.no_grad():
        before = model(ids).logits
    mlp0 = model.model.layers[0].mlp
    norm_w = model.model.norm.weight
    report = apply_fused_kernels(model)
    # 2 layers x (input + post-attention norm) + the final norm; 2 MLPs
    assert len(report.rmsnorm) == 5 and len(report.swiglu) == 2, report
    assert not report.skipped
    assert isinstance(model.model.norm, FusedRMSNorm) and model.model.norm.weight is norm_w  # shared Parameter
    fused_mlp = model.model.layers[0].mlp
    assert isinstance(fused_mlp, FusedSwiGLUMLP) and fused_mlp.gate_proj is mlp0.gate_proj
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)  # the CPU path is the modules' own expression
    assert str(report).startswith("fused kernels: 5 RMSNorm, 2 SwiGLU")
    assert report.rope == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "RoPE in 2 attention modules" in str(report)
    # idempotent, and the state dict keys are unchanged
    again = apply_fused_kernels(model)
    assert again.rmsnorm == [] and again.rope == [] and not again.skipped
    assert set(model.state_dict()) == set(tiny.build(arch).state_dict())


def test_switches_and_refusals():
    model = tiny.build("llama")
    r = apply_fused_kernels(model, rmsnorm=False)
    assert r.rmsnorm == [] and len(r.swiglu) == 2 and len(r.rope) == 2
    r = apply_fused_kernels(tiny.build("llama"), rope=False)
    assert r.rope == [] and len(r.rmsnorm) == 5
    with pytest.raises(ValueError, match="rope must be True or False"):
        apply_fused_kernels(model, rope=1)
    with pytest.raises(ValueError, match="swiglu must be True or False"):
        apply_fused_kernels(model, swiglu="yes")
    with pytest.raises(TypeError, match="nn.Module"):
        apply_fused_kernels("model")


def test_gemma_norm_and_foreign_modules():
    """GemmaRMSNorm is recognised by its expression; an RMSNorm-named module computing something else and a
    GELU MLP are left alone, with the reason."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    class OddRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(40))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight

    class GeluMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(40, 72), nn.Linear(40, 72), nn.Linear(72, 40)
            self.act_fn = nn.GELU()

    root = nn.Module()
    root.g = GemmaRMSNorm(40)
    with torch.no_grad():
        root.g.weight.normal_()
    root.odd, root.mlp = OddRMSNorm(), GeluMLP()
    x = torch.randn(3, 40)
    want = root.g(x)
    r = apply_fused_kernels(root)
    assert r.rmsnorm == ["g"] and root.g.gemma and torch.equal(root.g(x), want)
    assert set(r.skipped) == {"odd", "mlp"}
    assert "probe differs" in r.skipped["odd"] and "not SiLU" in r.skipped["mlp"]


def _train(model, steps=3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.sample_ids(batch=2, seq=10)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_tiny_llama_trains_identically(monkeypatch, backend_name):
    """Full fine-tuning (norm weights train: dW path) with the switches on and off: the same losses."""
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    plain = tiny.build("llama", num_hidden_layers=1).train()
    fused = tiny.build("llama", num_hidden_layers=1).train()
    report = apply_fused_kernels(fused)
    assert len(report.rope) == 1 and len(report.rmsnorm) == 3 and len(report.swiglu) == 1
    want = _train(plain)
    got = _train(fused)
    assert_close_to_reference(got, want.double(), torch.float32, "losses")
    for (n, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
        assert_close_to_reference(q.detach(), p.detach().double(), torch.float32, n)


def test_prepare_fused_kernels_with_lora():
    from peft_kernels.methods.lora import LoraConfig
    from peft_kernels.prepare import prepare
    model = tiny.build("llama")
    ids = tiny.sample_ids()
    ref_model, _ = prepare(tiny.build("llama"), LoraConfig(r=4, target_modules="all-linear"))
    model, report = prepare(model, LoraConfig(r=4, target_modules="all-linear"), fused_kernels=True)
    assert report.fused is not None and len(report.fused.swiglu) == 2 and len(report.fused.rope) == 2
    assert any(n.startswith("fused kernels:") for n in report.notes)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, FusedSwiGLUMLP) and type(mlp.gate_proj).__name__ == "LoraLinear"
    ref_model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)
    _, only_rope = prepare(tiny.build("llama"), "lora", fused_kernels={"rmsnorm": False, "swiglu": False})
    assert only_rope.fused.rmsnorm == only_rope.fused.swiglu == [] and len(only_rope.fused.rope) == 2
    _, no_rope = prepare(tiny.build("llama"), "lora", fused_kernels={"rope": False})
    assert no_rope.fused.rope == [] and len(no_rope.fused.rmsnorm) == 5
    with pytest.raises(ValueError, match="unknown fused_kernels"):
        prepare(tiny.build("llama"), "lora", fused_kernels={"gelu": True})
    with pytest.raises(ValueError, match="fused_kernels must be"):
        prepare(tiny.build("llama"), "lora", fused_kernels="on")


def test_cli_train_fused_kernels_flag(tmp_path, capsys):
    import json

    from peft_kernels import cli, demo
    data = tmp_path / "train.jsonl"
    data.write_text("".join(demo.DEMO_DATA.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(demo.DEMO_MODEL), "--data", str(data), "--method", "lora",
                     "--max-steps", "1", "--batch-size", "2", "--output-dir", str(out), "--no-progress",
                     "--fused-kernels"])
    stdout = capsys.readouterr().out
    assert code == 0 and "fused kernels:" in stdout and "SwiGLU MLP modules swapped" in stdout
    assert json.loads((out / "run_config.json").read_text())["fused_kernels"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": str(demo.DEMO_MODEL), "data": str(data), "output_dir": str(out),
                               "max_steps": 1, "fused_kernels": "yes"}))
    assert cli.main(["train", "--config", str(bad)]) != 0
    assert "fused_kernels must be true or false" in capsys.readouterr().err


def test_modules_with_hooks_or_extra_children_are_left():
    """A freshly initialised bottleneck adapter (hooked on the MLP) is the identity, so the MLP passes the
    probe; swapping it would silently drop the adapter. Hooks and extra children keep a module as it is."""
    from peft_kernels.methods.adapter import BottleneckConfig
    from peft_kernels.prepare import prepare

    model, report = prepare(tiny.build("llama"), BottleneckConfig(placement="pfeiffer", bottleneck=4),
                            fused_kernels=True)
    mlps = [n for n, m in model.named_modules() if n.endswith(".mlp")]
    assert report.fused.swiglu == [] and all("forward_hooks" in report.fused.skipped[n] for n in mlps)
    assert len(report.fused.rmsnorm) == 5
    assert any("bottleneck_adapters" in k for k in model.state_dict())
    # an extra child module (something a user attached) also keeps the module
    m2 = tiny.build("llama")
    m2.model.layers[0].post_attention_layernorm.extra = torch.nn.Identity()
    r2 = apply_fused_kernels(m2)
    assert "model.layers.0.post_attention_layernorm" not in r2.rmsnorm
    assert "child modules ['extra']" in r2.skipped["model.layers.0.post_attention_layernorm"]


# ------------------------------------------------------------------ RoPE: kernels' extension point
def _count_rope_calls(monkeypatch):
    """Count the fused op's calls (``ops.fused_layers.rope``, which ``apply_rotary_pos_emb`` calls per tensor)."""
    from peft_kernels.ops import fused_layers as FL
    calls = []
    real = FL.rope

    def counting(x, *args, **kw):
        calls.append(tuple(x.shape))
        return real(x, *args, **kw)

    monkeypatch.setattr(FL, "rope", counting)
    return calls


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rope_kernelized_keeps_logits_and_gradients(monkeypatch, arch, backend_name):
    """rope=True alone: each attention module's apply_rotary_pos_emb is kernelized (nothing else changes), the
    fused op runs for q and k in every layer, and logits and gradients equal the unswapped model's."""
    from kernels import get_kernelized_layers
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", backend_name)
    plain = tiny.build(arch).train()
    model = tiny.build(arch).train()
    report = apply_fused_kernels(model, rmsnorm=False, swiglu=False, rope=True)
    assert report.rope == ["model.layers.0.self_attn", "model.layers.1.self_attn"], report
    assert report.rmsnorm == report.swiglu == [] and not report.skipped
    kernelized = get_kernelized_layers(model)
    assert kernelized.layers == {}  # no module's forward was replaced: only the rotary functions
    assert sorted(kernelized.funcs) == [(n, "rotary_pos_emb") for n in report.rope]
    assert all(str(f.repo).find("hub_kernels/rotary") >= 0 for f in kernelized.funcs.values())
    ids = tiny.sample_ids(batch=2, seq=10)
    calls = _count_rope_calls(monkeypatch)
    got_logits, got_grads = _loss_and_grads(model, ids)
    assert len(calls) == 2 * 2  # q and k, in each of the 2 layers
    assert calls[0] == (2, 4, 10, 16) and calls[1] == (2, 2, 10, 16)
    want_logits, want_grads = _loss_and_grads(plain, ids)
    assert len(calls) == 4  # the unswapped model never calls it
    if backend_name == "reference":  # the CPU path is transformers' expression and its closed-form backward
        assert torch.equal(got_logits, want_logits)
    assert_close_to_reference(got_logits, want_logits.double(), torch.float32, "logits")
    for n, g in want_grads.items():
        assert_close_to_reference(got_grads[n], g.double(), torch.float32, n)


def test_rope_model_without_the_extension_point_is_left_with_a_reason():
    model = tiny.build("gpt2")
    report = apply_fused_kernels(model)
    assert report.rope == [] and set(report.skipped) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert all("use_kernelized_func(apply_rotary_pos_emb)" in why for why in report.skipped.values())
    assert "left transformer.h.0.attn: no kernelized apply_rotary_pos_emb" in str(report)


def _decorated_attention(func_body):
    """An attention-like module class whose rotary function (kernel name "rotary_pos_emb") is ``func_body``."""
    from kernels import use_kernel_forward_from_hub, use_kernelized_func
    rotary = use_kernel_forward_from_hub("rotary_pos_emb")(func_body)

    @use_kernelized_func(rotary)
    class ToyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)
            self.head_dim = 8

        def forward(self, q, k, cos, sin):
            return rotary(q, k, cos, sin)

    return ToyAttention


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):  # another rotation (e.g. Cohere's interleaved pairs)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rot(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _float32_rope(q, k, cos, sin, unsqueeze_dim=1):  # ModernBERT / ESM: computed in float32, cast back
    from transformers.models.llama.modeling_llama import rotate_half
    dtype = q.dtype
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q, k = q.float(), k.float()
    return (q * cos + rotate_half(q) * sin).to(dtype), (k * cos + rotate_half(k) * sin).to(dtype)


def test_rope_other_rotary_functions_fail_the_probe_and_are_left():
    """A module whose "rotary_pos_emb" function computes anything else is left, with the reason; the float32
    variant equals the expression in float32 but not with bfloat16 q/k, so it is left too."""
    root = nn.Module()
    root.inter = _decorated_attention(_interleaved_rope)()
    root.f32 = _decorated_attention(_float32_rope)()
    report = apply_fused_kernels(root)
    assert report.rope == [] and set(report.skipped) == {"inter", "f32"}
    assert all("probe differs" in why for why in report.skipped.values()), report.skipped


def test_rope_fallback_for_arguments_the_fused_op_does_not_take(monkeypatch):
    """Pixtral calls apply_rotary_pos_emb with [S, D] tables and unsqueeze_dim=0: transformers' expression
    runs (same result, the fused op is not called); the same goes for cos/sin that require grad."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from peft_kernels.nn.fused import FusedRotaryPosEmb
    layer = FusedRotaryPosEmb()
    calls = _count_rope_calls(monkeypatch)
    q, k = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    for got, want in zip(layer(q, k, cos, sin, 0), apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)):
        assert torch.equal(got, want)
    q4, k4 = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8)
    cos3, sin3 = cos[None].requires_grad_(True), sin[None]
    for got, want in zip(layer(q4, k4, cos3, sin3), apply_rotary_pos_emb(q4, k4, cos3, sin3)):
        assert torch.equal(got, want) and got.requires_grad
    assert calls == []
    layer(q4, k4, cos3.detach(), sin3)
    assert len(calls) == 2


def test_rope_without_kernels_or_with_a_broken_repository_is_left_with_a_reason(monkeypatch, tmp_path):
    import sys

    import peft_kernels.fused as fused_mod
    model = tiny.build("llama")  # first: transformers must not import its modeling code without kernels
    monkeypatch.setitem(sys.modules, "kernels", None)  # import kernels -> ImportError
    report = apply_fused_kernels(model, rmsnorm=False, swiglu=False)
    assert report.rope == [] and len(report.skipped) == 2
    assert all("kernels package is not importable" in why for why in report.skipped.values())
    assert any("kernels package is not importable" in n for n in report.notes)
    monkeypatch.undo()
    monkeypatch.setattr(fused_mod, "ROPE_REPO_PATH", tmp_path)  # no build variant there
    model = tiny.build("llama")
    report = apply_fused_kernels(model, rmsnorm=False, swiglu=False)
    assert report.rope == [] and len(report.skipped) == 2
    assert all(why.startswith("kernelize failed: FileNotFoundError: Cannot find a build variant")
               for why in report.skipped.values()), report.skipped
    from kernels import get_kernelized_layers
    assert get_kernelized_layers(model).funcs == {}  # nothing half-done


def test_rope_kernelized_model_copies_pickles_and_saves(tmp_path, monkeypatch):
    """deepcopy, pickle and save_pretrained of a kernelized model: the copies stay kernelized (their own
    wrappers), the state dict keys are unchanged, a plain model loads the saved weights."""
    import transformers as tf
    model = tiny.build("llama")
    apply_fused_kernels(model, rmsnorm=False, swiglu=False)
    ids = tiny.sample_ids()
    with torch.no_grad():
        want = model(ids).logits
    assert set(model.state_dict()) == set(tiny.build("llama").state_dict())
    calls = _count_rope_calls(monkeypatch)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        w = other.model.layers[0].self_attn._kernel_funcs["rotary_pos_emb"]
        assert w is not model.model.layers[0].self_attn._kernel_funcs["rotary_pos_emb"]
        assert w.forward.__self__ is w  # the kernelized forward is bound to the copy's own wrapper
        del calls[:]
        with torch.no_grad():
            assert torch.equal(other(ids).logits, want)
        assert len(calls) == 4
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, want)


def test_rope_saves_what_transformers_saves():
    """The estimator's claim (rope changes no memory term): a training forward saves the same tensors, byte for
    byte, with the fused RoPE as with transformers' expression (both keep cos and sin, nothing else)."""
    def saved_bytes(model, ids):
        kept = []  # every saved tensor stays alive (no storage address reused) until counted

        def pack(t):  # the graph holds an index, not the tensor: a saved output would make a leaking cycle
            kept.append(t)
            return len(kept) - 1
        with torch.autograd.graph.saved_tensors_hooks(pack, kept.__getitem__):
            model(input_ids=ids, labels=ids).loss
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
        kept.clear()
        return sum(storages.values()), len(storages)

    ids = tiny.sample_ids(batch=2, seq=10)
    plain = tiny.build("llama").train()
    fused = tiny.build("llama").train()
    assert len(apply_fused_kernels(fused, rmsnorm=False, swiglu=False).rope) == 2
    assert saved_bytes(fused, ids) == saved_bytes(plain, ids)


def test_rope_kernel_repository_is_in_the_package_and_matches_its_digest():
    """The shipped repository (Hub layout, build/torch-universal) loads through kernels, and its metadata's
    digest matches the files (kernels checks it on every load; after editing the files, regenerate it:
    ``Digest.hash_variant(DigestAlgorithm.SHA256, variant).files`` into metadata.json's digest.files)."""
    from kernels import LocalLayerRepository
    from kernels._rust import Digest, DigestAlgorithm, Metadata

    from peft_kernels.fused import ROPE_LAYER_NAME, ROPE_REPO_PATH
    from peft_kernels.nn.fused import FusedRotaryPosEmb
    variant = ROPE_REPO_PATH / "build" / "torch-universal"
    meta = Metadata.read_from_file(variant / "metadata.json")
    assert meta.digest is not None
    assert Digest.hash_variant(DigestAlgorithm.SHA256, variant).files == meta.digest.files
    layer = LocalLayerRepository(repo_path=ROPE_REPO_PATH, layer_name=ROPE_LAYER_NAME).load()
    assert layer is FusedRotaryPosEmb


@pytest.mark.gpu
def test_rope_on_cuda_bf16_is_kernelized_with_the_modules_bits():
    """On CUDA the kernelized function is the Triton kernel, which rounds as transformers' expression does in
    16-bit: the probe passes and the logits are the unswapped model's, bit for bit. (In float32 the probe
    may leave the modules, with the reason, if the kernel's products are contracted into FMAs.)"""
    plain = tiny.build("llama", dtype=torch.bfloat16).cuda()
    model = tiny.build("llama", dtype=torch.bfloat16).cuda()
    report = apply_fused_kernels(model, rmsnorm=False, swiglu=False)
    assert report.rope == ["model.layers.0.self_attn", "model.layers.1.self_attn"], report
    ids = tiny.sample_ids().cuda()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
