"""apply_fused_kernels on tiny transformers models: what is swapped, identical outputs, identical training."""
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
    # idempotent, and the state dict keys are unchanged
    assert apply_fused_kernels(model).rmsnorm == []
    assert set(model.state_dict()) == set(tiny.build(arch).state_dict())


def test_switches_and_refusals():
    model = tiny.build("llama")
    r = apply_fused_kernels(model, rmsnorm=False)
    assert r.rmsnorm == [] and len(r.swiglu) == 2
    with pytest.raises(ValueError, match="rope=True is not offered"):
        apply_fused_kernels(model, rope=True)
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
    apply_fused_kernels(fused)
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
    assert report.fused is not None and len(report.fused.swiglu) == 2
    assert any(n.startswith("fused kernels:") for n in report.notes)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, FusedSwiGLUMLP) and type(mlp.gate_proj).__name__ == "LoraLinear"
    ref_model.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)
    with pytest.raises(ValueError, match="unknown fused_kernels"):
        prepare(tiny.build("llama"), "lora", fused_kernels={"rope": True})
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
