"""`make demo`: the shipped assets, the asset script, and the fine-tune end to end (few steps)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from peft_kernels import demo

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "peft_kernels" / "assets"


# ---------------------------------------------------------------- the shipped assets
def test_shipped_assets_are_small_and_complete():
    files = [f for f in ASSETS.rglob("*") if f.is_file()]
    names = {f.relative_to(ASSETS).as_posix() for f in files}
    for need in ("demo_model/config.json", "demo_model/model.safetensors", "demo_model/tokenizer.json",
                 "demo_data.jsonl", "demo_data_eval.jsonl", "demo_pretrain_eval.txt"):
        assert need in names, need
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # safetensors only, never pickle
    assert sum(f.stat().st_size for f in files) < 4 * 2**20


def test_shipped_model_and_tokenizer_load_offline():
    model, tok = demo.load_causal_lm(demo.DEMO_MODEL)
    assert model.config.model_type == "llama" and model.config.vocab_size <= 2048
    assert len(tok) <= model.config.vocab_size
    assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert tok.pad_token_id != tok.eos_token_id  # padding must never look like the end of an answer
    conv = [{"role": "user", "content": "Where does Alice live?"}, {"role": "assistant", "content": "x"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text.startswith(tok.bos_token) and text.endswith(tok.eos_token)
    # the assistant turn is marked for transformers' assistant-token mask
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = enc["assistant_masks"]
    assert 0 < sum(mask) < len(mask)
    # fp32 weights loaded from bf16 safetensors: finite logits of the right shape
    ids = tok("Alice lives in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def _people(path):
    out = set()
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        out.add(re.findall(r"\b([A-Z][a-z]+)\b", rec["messages"][0]["content"])[-1])
    return out


def test_shipped_data_train_and_heldout_people_are_disjoint():
    from peft_kernels.train.data import load_records

    assert len(load_records(demo.DEMO_DATA)) >= 100
    train, held = _people(demo.DEMO_DATA), _people(demo.DEMO_EVAL)
    assert held and not (train & held)
    world = json.loads((ASSETS / "world.json").read_text())
    assert held == set(world["held_out"])
    # the held-out people are in the pretraining text: their facts are known, only the chat format is new
    text = demo.DEMO_PRETRAIN_EVAL.read_text()
    assert all(name in text for name in held)
    docs = load_records(demo.DEMO_PRETRAIN_EVAL)
    assert len(docs) >= 50 and all("text" in d for d in docs)


# ---------------------------------------------------------------- the asset script
def test_make_demo_assets_small_run_is_deterministic(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_demo_assets as mda
    finally:
        sys.path.pop(0)
    args = ["--steps", "2", "--docs", "120", "--layers", "1", "--hidden", "64", "--vocab", "400", "--batch", "2",
            "--seq-len", "32"]
    assert mda.main(["--out", str(tmp_path / "a"), *args]) == 0
    assert mda.main(["--out", str(tmp_path / "b"), *args]) == 0
    for f in ("demo_data.jsonl", "demo_data_eval.jsonl", "demo_pretrain_eval.txt", "demo_model/tokenizer.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    model, tok = demo.load_causal_lm(tmp_path / "a" / "demo_model")
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert tok.chat_template and len(tok) <= 400


# ---------------------------------------------------------------- the demo
def test_demo_fine_tunes_reports_and_saves_a_loadable_adapter(tmp_path, capsys):
    from peft_kernels.methods.registry import load_adapters
    from peft_kernels.prepare import prepare

    args = demo.build_parser().parse_args(["--steps", "12", "--out", str(tmp_path / "out"), "--text-docs", "16",
                                           "--eval-answers", "4", "--no-progress"])
    r = demo.fine_tune(args)
    # 12 steps of LoRA at the demo's learning rate already move the held-out task loss a lot
    assert r.loss_after < r.loss_before - 0.5
    assert len(r.train.losses) == 12 and r.train.losses[-1] < r.train.losses[0]
    assert r.text_loss_before is not None and r.text_loss_after is not None
    assert [lab for lab, *_ in r.samples] == ["held-out", "training"]
    # the saved adapter, loaded on a freshly prepared base, computes what the trained model computes
    fresh, tok = demo.load_causal_lm(demo.DEMO_MODEL)
    fresh, _ = prepare(fresh, demo.method_config("lora", 8), quantize=True)
    fresh = load_adapters(fresh, r.adapter_dir)
    ids = tok("Where does Hugo live?", return_tensors="pt")["input_ids"]
    r.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, r.model(input_ids=ids).logits, rtol=0, atol=1e-5)
    capsys.readouterr()


def test_demo_main_prints_before_after_and_samples(tmp_path, capsys):
    assert demo.main(["--steps", "3", "--out", str(tmp_path / "o"), "--text-docs", "8", "--eval-answers", "2"]) == 0
    out = capsys.readouterr()
    m = re.search(r"held-out task loss:\s+([\d.]+) before -> ([\d.]+) after", out.out)
    assert m and float(m.group(2)) < float(m.group(1))
    assert re.search(r"held-out answers right:\s+\d/2 before -> \d/2 after", out.out)
    assert re.search(r"pretraining-text loss:\s+[\d.]+ before -> [\d.]+ after", out.out)
    assert out.out.count("  before:   ") == 2 and out.out.count("  expected: ") == 2
    assert "trainable params:" in out.out and "adapter saved to" in out.out
    assert "train:" in out.err and "loss=" in out.err  # the progress bar (tqdm writes to stderr)
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------- bad model paths
def _bad_paths(tmp):
    missing = tmp / "nope"
    a_file = tmp / "f.txt"
    a_file.write_text("hello")
    empty = tmp / "empty"
    empty.mkdir()
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    no_weights = tmp / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    vision = tmp / "vit"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (vision / "model.safetensors").write_bytes(b"")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((demo.DEMO_MODEL / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
    return [(missing, "does not exist"), (a_file, "is a file"), (empty, "no config.json"),
            (adapter, "holds an adapter"), (broken, "not valid JSON"), (no_weights, "no weights"),
            (vision, "not a causal language model"), (corrupt, "loading the weights failed")]


def test_model_paths_that_are_not_models_give_clear_errors(tmp_path, capsys):
    for path, msg in _bad_paths(tmp_path):
        with pytest.raises(demo.ModelPathError, match=msg):
            demo.load_causal_lm(path)
    # through the command line: one line naming the path, exit code 2, before any training
    assert demo.main(["--model", str(tmp_path / "noweights"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "noweights" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_demo_bad_data_and_method_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert demo.main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert demo.main(["--method", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method" in capsys.readouterr().err


# ---------------------------------------------------------------- any local causal LM
def test_demo_fine_tunes_another_local_model_and_data_format(tmp_path, capsys):
    """--model/--data: a GPT-2 (Conv1D layers) with a tokenizer lacking a chat template and a pad token,
    trained on prompt/completion records; 10% of them are held out for the before/after numbers."""
    from transformers import AutoTokenizer

    from _tiny_models import build

    tok = AutoTokenizer.from_pretrained(demo.DEMO_MODEL)
    tok.chat_template = None
    tok.pad_token = None
    model = build("gpt2", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  n_positions=128)
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    assert not (tmp_path / "gpt2" / "chat_template.jinja").exists()
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Where does {n} live?", "completion": f" {n} lives in {t}."}) + "\n"
                            for n, t in [("Alice", "Amberly"), ("Bruno", "Dunmore"), ("Clara", "Juniper")] * 4))
    code = demo.main(["--model", str(tmp_path / "gpt2"), "--data", str(data), "--steps", "4", "--lr", "1e-2",
                      "--out", str(tmp_path / "o"), "--eval-answers", "1", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "GPT2LMHeadModel" in out.out and "(11 training examples, 1 held-out)" in out.out
    m = re.search(r"held-out task loss:\s+([\d.]+) before -> ([\d.]+) after", out.out)
    assert m and float(m.group(2)) < float(m.group(1))
    assert "pretraining-text loss" not in out.out  # no forgetting text unless --text-eval is given
    cfg = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16  # --model uses the usual QLoRA settings
    assert any(t.endswith("attn.c_attn") for t in cfg["target_modules"])
