"""The `peft-kernels` command line, in process (`cli.main(argv)`), on the shipped tiny demo model."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_kernels import cli, demo
from _tolerance import assert_close_to_reference

REPO = Path(__file__).resolve().parents[1]
MODEL = str(demo.DEMO_MODEL)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(demo.DEMO_DATA.read_text().splitlines(keepends=True)[:8]))
    return path


def _ids():
    _, tok = demo.load_causal_lm(demo.DEMO_MODEL)
    return tok("Where does Alice live? Alice lives in", return_tensors="pt")["input_ids"]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ===================================================================== parser
def test_help_and_usage_errors(capsys):
    assert run(capsys, "--help")[0] == 0
    code, _, err = run(capsys)
    assert code == 2 and "required" in err
    code, _, err = run(capsys, "nosuch")
    assert code == 2 and "invalid choice" in err


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "peft_kernels", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for cmd in ("train", "demo", "estimate", "merge", "convert", "bench"):
        assert cmd in proc.stdout


# ===================================================================== train
def test_train_from_flags_saves_adapter_and_run_config(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", MODEL, "--data", data_file, "--method", "lora", "--quantize",
                            "--max-steps", 2, "--batch-size", 4, "--lr", "1e-3", "--output-dir", out, "--no-progress",
                            "--set", "method.r=4")
    assert code == 0, err
    assert "trained 2 steps" in stdout and "4-bit" in stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["quantize"] is True and run_cfg["train"]["lr"] == 1e-3 and run_cfg["method"] == {"name": "lora",
                                                                                                      "r": 4}


def test_train_from_yaml_and_json_configs(tmp_path, data_file, capsys):
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(f"model: {MODEL}\ndata: {data_file}\nmethod:\n  name: bitfit\n"
                        f"train:\n  output_dir: {tmp_path / 'y'}\n  max_steps: 1\n  batch_size: 2\n  progress: false\n")
    code, stdout, err = run(capsys, "train", "--config", yaml_cfg)
    assert code == 0, err
    assert json.loads((tmp_path / "y" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    # JSON, flat (TrainConfig fields at the top level), a flag overriding the file
    json_cfg = tmp_path / "run.json"
    json_cfg.write_text(json.dumps({"model": MODEL, "data": str(data_file), "method": "ia3", "max_steps": 5,
                                    "batch_size": 2, "output_dir": str(tmp_path / "j"), "progress": False}))
    code, stdout, err = run(capsys, "train", "--config", json_cfg, "--max-steps", 1)
    assert code == 0, err
    assert "trained 1 steps" in stdout
    assert json.loads((tmp_path / "j" / "run_config.json").read_text())["train"]["max_steps"] == 1
    # full fine-tuning writes the whole model, which transformers loads as it is
    code, stdout, err = run(capsys, "train", "--model", MODEL, "--data", data_file, "--method", "full", "--max-steps",
                            1, "--batch-size", 2, "--output-dir", tmp_path / "f", "--no-progress")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(tmp_path / "f" / "model")
    base, _ = demo.load_causal_lm(demo.DEMO_MODEL)
    assert not torch.equal(full.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("body, message", [
    ({"modle": MODEL}, "unknown config key(s) ['modle']"),
    ({"train": {"max_step": 3}}, "unknown key(s) ['max_step'] in the 'train' section"),
    ({"method": {"name": "lora", "rank": 4}}, "unknown lora config key(s) ['rank']"),
    ({"method": "lorax"}, "unknown method 'lorax'"),
    ({"max_steps": 0}, "max_steps must be an integer >= 1"),
    ({"lr": -1}, "lr must be a finite number > 0"),
    ({"quantize": "yes"}, "quantize must be true, false or a mapping"),
    ({"data": None}, "needs 'data'"),
    ({"method": "prompt_tuning"}, "needs num_virtual_tokens (give settings with --set method.KEY=VALUE"),
    ({"method": "full", "quantize": True}, "quantize needs a PEFT method"),
])
def test_train_config_errors_are_clear_and_early(tmp_path, data_file, capsys, body, message):
    base = {"model": MODEL, "data": str(data_file), "output_dir": str(tmp_path / "o"), "max_steps": 1}
    for k, v in body.items():
        if k == "train":
            base["train"] = v
        elif v is None:
            base.pop(k)
        else:
            base[k] = v
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(base))
    code, _, err = run(capsys, "train", "--config", cfg)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_train_unreadable_config_files(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: a\n  data: [unclosed\n")
    code, _, err = run(capsys, "train", "--config", bad_yaml)
    assert code == 2 and "invalid YAML at line" in err
    code, _, err = run(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "does not exist" in err
    txt = tmp_path / "cfg.txt"
    txt.write_text("model: a")
    assert "unknown config file type" in run(capsys, "train", "--config", txt)[2]
    code, _, err = run(capsys, "train", "--model", MODEL, "--data", "x.jsonl", "--output-dir", tmp_path, "--max-steps",
                       1, "--set", "noequals")
    assert code == 2 and "KEY=VALUE" in err


def test_train_malformed_data_and_not_a_model(tmp_path, data_file, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": 3}\n')
    code, _, err = run(capsys, "train", "--model", MODEL, "--data", bad, "--output-dir", tmp_path / "o",
                       "--max-steps", 1)
    assert code == 2 and "line 3" in err and str(bad) in err
    code, _, err = run(capsys, "train", "--model", tmp_path, "--data", data_file, "--output-dir", tmp_path / "o",
                       "--max-steps", 1)
    assert code == 2 and "no config.json" in err


def test_train_resume_from_another_runs_checkpoint_is_refused(tmp_path, data_file, capsys):
    common = ["--model", MODEL, "--method", "lora", "--max-steps", 1, "--batch-size", 2, "--no-progress"]
    code, _, err = run(capsys, "train", *common, "--data", data_file, "--output-dir", tmp_path / "a", "--save-every", 1)
    assert code == 0, err
    ckpt = tmp_path / "a" / "checkpoint-1"
    assert ckpt.is_dir()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(demo.DEMO_DATA.read_text().splitlines(keepends=True)[20:28]))
    code, _, err = run(capsys, "train", *common, "--max-steps", 2, "--data", other, "--output-dir", tmp_path / "b",
                       "--resume", ckpt)
    assert code == 2 and "another run" in err and "training data differs" in err


# ===================================================================== estimate
def _llama_config(path, **over):
    d = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512,
         "torch_dtype": "bfloat16"}
    d.update(over)
    path.write_text(json.dumps(d))
    return path


def test_estimate_reads_only_the_config(tmp_path, capsys):
    from transformers import AutoConfig

    from peft_kernels.train.estimate import estimate_memory

    cfg = _llama_config(tmp_path / "config.json")
    code, stdout, err = run(capsys, "estimate", "--config", cfg, "--method", "lora", "--seq-len", 256, "--batch", 2,
                            "--quantize", "--precision", "fp32", "--json")
    assert code == 0, err
    got = json.loads(stdout)
    want = estimate_memory(AutoConfig.for_model("llama", **{k: v for k, v in json.loads(cfg.read_text()).items()
                                                            if k != "model_type"}),
                           method="lora", seq_len=256, batch_size=2, quantize=True, precision="fp32",
                           gradient_checkpointing=False, optimizer="adamw", lora_r=16, fused_cross_entropy=True)
    assert got["total_bytes"] == want.total_bytes > 0
    full_logits = json.loads(run(capsys, "estimate", "--config", cfg, "--method", "lora", "--seq-len", 256, "--batch",
                                 2, "--quantize", "--precision", "fp32", "--json", "--no-fused-cross-entropy")[1])
    assert full_logits["total_bytes"] > want.total_bytes
    # a model directory whose weights file is garbage: the estimate never opens it
    mdir = tmp_path / "m"
    mdir.mkdir()
    _llama_config(mdir / "config.json")
    (mdir / "model.safetensors").write_bytes(b"not a safetensors file")
    code, stdout, err = run(capsys, "estimate", "--model", mdir, "--method", "lora", "--seq-len", 512)
    assert code == 0, err
    assert "lora" in stdout and "seq 512" in stdout
    # longer sequences need more memory
    small = json.loads(run(capsys, "estimate", "--config", cfg, "--seq-len", 128, "--json")[1])["total_bytes"]
    large = json.loads(run(capsys, "estimate", "--config", cfg, "--seq-len", 1024, "--json")[1])["total_bytes"]
    assert large > small


def test_estimate_memory_switches_for_well_known_shapes(capsys):
    from peft_kernels.train.estimate import estimate_memory, llama_config

    code, stdout, err = run(capsys, "estimate", "--shape", "llama-3-70b", "--method", "qlora", "--quantize",
                            "--gradient-checkpointing", "--optimizer", "paged_adamw8bit", "--all-switches", "--json")
    assert code == 0, err
    want = estimate_memory(llama_config("llama-3-70b"), method="qlora", quantize=True, seq_len=2048, precision="bf16",
                           gradient_checkpointing=True, optimizer="paged_adamw8bit", fused_cross_entropy=True,
                           quantize_embeddings=True, quantize_head=True, offload_activations=True,
                           optimizer_in_backward=True, fused_kernels=True)
    assert json.loads(stdout)["total_bytes"] == want.total_bytes
    code, _, err = run(capsys, "estimate", "--shape", "llama-3-8b", "--offload-activations")
    assert code == 2 and "needs gradient_checkpointing" in err


def test_estimate_bad_inputs(tmp_path, capsys):
    code, _, err = run(capsys, "estimate", "--config", tmp_path / "none.json")
    assert code == 2 and "no model config" in err
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    code, _, err = run(capsys, "estimate", "--config", bad)
    assert code == 2 and "no model_type" in err
    code, _, err = run(capsys, "estimate", "--config", _llama_config(tmp_path / "l.json"), "--method", "nosuch")
    assert code == 2 and "nosuch" in err
    assert run(capsys, "estimate")[0] == 2  # --model or --config is required


# ===================================================================== merge
def _lora_model(quantize: bool):
    """The demo model in fp32 (4-bit when ``quantize``) with a random (non-zero) r=4 LoRA adapter."""
    from peft_kernels.methods import lora
    from peft_kernels.quant.model import quantize_model

    torch.manual_seed(0)
    model, tok = demo.load_causal_lm(demo.DEMO_MODEL)
    if quantize:
        quantize_model(model)
    lora.apply(model, lora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model


def _save_adapter(model, directory):
    from peft_kernels.methods.registry import save_adapters

    return save_adapters(model, directory)


def test_merge_lora_into_a_dense_base_is_exact(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    ids = _ids()
    model = _lora_model(quantize=False)
    want = _logits(model, ids)
    _save_adapter(model, tmp_path / "adapter")
    code, stdout, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "adapter", "--out",
                            tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    assert "dense checkpoint" in stdout
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert_close_to_reference(_logits(merged, ids), want, torch.float32)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # the output is not silently overwritten
    code, _, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "adapter", "--out",
                       tmp_path / "merged")
    assert code == 2 and "--overwrite" in err


def test_merge_qlora_adapter_dequantize_and_requantize(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.quant.checkpoint import load_quantized

    ids = _ids()
    model = _lora_model(quantize=True)
    want = _logits(model, ids)
    _save_adapter(model, tmp_path / "run" / "adapter")
    # what `peft-kernels train --quantize` leaves next to the adapter: merge reads it
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"quantize": True}))
    code, stdout, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "run" / "adapter", "--out",
                            tmp_path / "deq", "--dtype", "fp32")
    assert code == 0, err
    assert "trained on a 4-bit base" in stdout and "dequantize" in stdout
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    assert getattr(dense.config, "quantization_config", None) is None
    assert_close_to_reference(_logits(dense, ids), want, torch.float32)  # dequant(W4) + sBA exactly

    code, stdout, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "run" / "adapter", "--out",
                            tmp_path / "req", "--mode", "requantize")
    assert code == 0, err
    assert "4-bit checkpoint" in stdout
    req = load_quantized(tmp_path / "req", dtype=torch.float32)
    assert any(isinstance(m, Linear4bit) for m in req.modules())
    base4 = demo.load_causal_lm(demo.DEMO_MODEL)[0]
    from peft_kernels.quant.model import quantize_model
    quantize_model(base4)
    # requantizing costs some accuracy, but the merged adapter is there: much closer than the base alone
    assert _rel(_logits(req, ids), want) < 0.5 * _rel(_logits(base4, ids), want)


def test_merge_refuses_what_cannot_be_merged(tmp_path, capsys):
    from peft_kernels.methods import adapter as bottleneck

    model, _ = demo.load_causal_lm(demo.DEMO_MODEL)
    bottleneck.apply(model, bottleneck.BottleneckConfig())
    _save_adapter(model, tmp_path / "ad")
    code, _, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "ad", "--out", tmp_path / "m")
    assert code == 2 and "cannot be merged" in err
    code, _, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "none", "--out", tmp_path / "m")
    assert code == 2 and "no such adapter directory" in err
    assert not (tmp_path / "m").exists()


# ===================================================================== convert
def _linear4bit_tensors(model):
    from peft_kernels.nn.linear4bit import Linear4bit

    return {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for k, v in m.state_dict().items()}


def test_convert_checkpoint_dense_to_4bit_resave_and_dequantize(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from peft_kernels.nn.linear4bit import Linear4bit
    from peft_kernels.quant.checkpoint import load_quantized
    from peft_kernels.quant.model import quantize_model

    code, stdout, err = run(capsys, "convert", "checkpoint", MODEL, tmp_path / "q4")
    assert code == 0, err
    assert "quantized the dense checkpoint" in stdout
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    # the same bytes quantize_model makes from the same (bf16) weights
    q4 = load_quantized(tmp_path / "q4")
    ref, _ = demo.load_causal_lm(demo.DEMO_MODEL, dtype=torch.bfloat16)
    quantize_model(ref)
    got, want = _linear4bit_tensors(q4), _linear4bit_tensors(ref)
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # 4-bit -> ours again: the same tensors
    code, stdout, err = run(capsys, "convert", "checkpoint", tmp_path / "q4", tmp_path / "q4b")
    assert code == 0 and "re-saved the 4-bit checkpoint" in stdout, err
    again = _linear4bit_tensors(load_quantized(tmp_path / "q4b"))
    assert all(torch.equal(again[k], got[k]) for k in got)

    # 4-bit -> dense: plain transformers loads it, weights = dequant(W4)
    code, stdout, err = run(capsys, "convert", "checkpoint", tmp_path / "q4", tmp_path / "dense", "--dequantize",
                            "--dtype", "fp32")
    assert code == 0, err
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert getattr(dense.config, "quantization_config", None) is None
    layer = q4.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, layer.dequantize(torch.float32))
    assert (tmp_path / "dense" / "tokenizer.json").is_file()

    code, _, err = run(capsys, "convert", "checkpoint", tmp_path / "nope", tmp_path / "x")
    assert code == 2 and "does not exist" in err


def test_convert_adapter_through_peft_and_back(tmp_path, capsys):
    from peft_kernels.methods.registry import load_adapters

    ids = _ids()
    model = _lora_model(quantize=False)
    want = _logits(model, ids)
    _save_adapter(model, tmp_path / "ours")
    code, stdout, err = run(capsys, "convert", "adapter", tmp_path / "ours", tmp_path / "peft", "--model", MODEL,
                            "--to", "peft")
    assert code == 0, err
    assert "saved by it" in stdout
    assert (tmp_path / "peft" / "README.md").is_file()  # PEFT's own save_pretrained writes a model card
    code, stdout, err = run(capsys, "convert", "adapter", tmp_path / "peft", tmp_path / "back", "--model", MODEL)
    assert code == 0, err
    fresh, _ = demo.load_causal_lm(demo.DEMO_MODEL)
    fresh = load_adapters(fresh, tmp_path / "back")
    assert_close_to_reference(_logits(fresh, ids), want, torch.float32)

    # a method PEFT does not have, and a directory that is no adapter
    from peft_kernels.methods import bitfit

    m, _ = demo.load_causal_lm(demo.DEMO_MODEL)
    bitfit.apply(m, bitfit.BitFitConfig())
    _save_adapter(m, tmp_path / "bitfit")
    code, _, err = run(capsys, "convert", "adapter", tmp_path / "bitfit", tmp_path / "x", "--model", MODEL,
                       "--to", "peft")
    assert code == 2 and "bitfit" in err
    code, _, err = run(capsys, "convert", "adapter", tmp_path, tmp_path / "y", "--model", MODEL)
    assert code == 2 and "not a directory save_adapters wrote" in err


# ===================================================================== bench and demo
def test_bench_commands(capsys):
    code, stdout, _ = run(capsys, "bench", "--print-command")
    assert code == 0 and "-m pytest" in stdout and stdout.rstrip().endswith("bench -q")
    stdout = run(capsys, "bench", "--time", "--print-command")[1]
    assert "--benchmark-only" in stdout
    stdout = run(capsys, "bench", "--gpu", "--print-command", "--", "--dry-run", "--sections", "g")[1]
    assert "gpu_suite.py --dry-run --sections g" in stdout
    stdout = run(capsys, "bench", "--methods", "--print-command", "--", "--quick")[1]
    assert "compare_methods.py --quick" in stdout
    assert run(capsys, "bench", "--gpu", "--methods")[0] == 2


def _compare_methods():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "bench" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_compare_methods_quick_writes_table_and_plot(tmp_path, capsys):
    cm = _compare_methods()
    keys = [s.key for s in cm.SPECS]
    for need in ("full", "lora", "qlora", "dora", "bitfit", "sparse", "adapter", "prompt_tuning", "freeze"):
        assert need in keys
    assert cm.main(["--quick", "--steps", "2", "--out", str(tmp_path)]) == 0, capsys.readouterr().out
    data = json.loads((tmp_path / "compare_methods.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == set(keys) and not any(r["error"] for r in rows.values())
    full = rows["full"]
    assert full["trainable"] == full["total"]
    for k, r in rows.items():
        assert r["peak_bytes"] > 0 and r["tokens_per_s"] > 0, k
        if k != "full":
            assert 0 < r["trainable"] < full["trainable"], k
    assert rows["qlora"]["trainable"] == rows["lora"]["trainable"]
    assert rows["qlora"]["peak_bytes"] < rows["lora"]["peak_bytes"]  # the 4-bit base is smaller
    table = (tmp_path / "compare_methods.md").read_text()
    assert table.count("\n| ") == len(keys) + 1 and "forgetting" in table
    png = (tmp_path / "compare_methods.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_subcommand(tmp_path, capsys):
    code, stdout, err = run(capsys, "demo", "--steps", 2, "--out", tmp_path, "--text-docs", 4, "--eval-answers", 2,
                            "--no-progress")
    assert code == 0, err
    assert "held-out task loss" in stdout and (tmp_path / "adapter" / "adapter_config.json").is_file()
    code, _, err = run(capsys, "demo", "--model", tmp_path, "--out", tmp_path / "x")
    assert code == 2 and "no config.json" in err


def test_a_full_disk_while_saving_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    model = _lora_model(quantize=False)
    _save_adapter(model, tmp_path / "adapter")

    def full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code, _, err = run(capsys, "merge", "--model", MODEL, "--adapter", tmp_path / "adapter", "--out",
                       tmp_path / "merged", "--dtype", "fp32")
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no output, no staging left behind


def test_train_under_torchrun_matches_one_process(tmp_path, data_file, capsys):
    """`torchrun --nproc_per_node 2 -m peft_kernels train` (DDP over gloo, 4-bit base): the adapter equals a
    single process accumulating the same two micro-batches per step."""
    from safetensors.torch import load_file

    args = ["train", "--model", MODEL, "--data", str(data_file), "--method", "lora", "--quantize", "--max-steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peft_kernels",
                           *args, "--output-dir", str(tmp_path / "ddp")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 steps on 2 processes") == 1  # rank 0 alone reports
    code, _, err = run(capsys, *args, "--grad-accum", 2, "--output-dir", tmp_path / "one")
    assert code == 0, err
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    for k in one:
        assert_close_to_reference(ddp[k], one[k], torch.float32)
    assert any(one[k].abs().max() > 0 for k in one if "lora_B" in k)  # the adapter did train
