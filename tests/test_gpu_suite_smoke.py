"""Smoke test of bench/gpu_suite.py without a GPU: its --dry-run runs every section at tiny sizes on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("PEFT_KERNELS_BACKEND", None)
    # ~15 s on 2 idle cores (sections a-f); the timeout only stops a hang.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_suite.json").read_text()), proc.stdout, out


def test_sections_and_metadata(dry_run):
    res, _, _ = dry_run
    for key in ("meta", "ceilings", "dequant", "linear_fwd_bwd", "linear_summary", "gemv_m1", "crossover",
                "lora_fwd_bwd", "lora_summary", "decoder_layer", "decoder_summary", "notes", "ok"):
        assert key in res, key
    assert res["ok"] is True
    meta = res["meta"]
    assert meta["dry_run"] is True and meta["ours_backend"] == "reference"
    for key in ("date_utc", "command", "torch", "triton", "device"):
        assert meta.get(key), key
    assert {c["status"] for c in res["ceilings"].values()} == {"ok"}
    assert res["ceilings"]["copy"]["gbps"] > 0 and res["ceilings"]["gemm"]["tflops"] > 0


def test_rows_checked_and_timed(dry_run):
    res, _, _ = dry_run
    rows = res["dequant"] + res["linear_fwd_bwd"] + res["gemv_m1"] + res["crossover"]
    assert not [r for r in rows if r["status"] in ("FAIL", "error")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["ms"] > 0 and any(k.startswith("rel_err") for k in r) for r in ok)
    # Without CUDA the Triton and CUDA C rows are skipped with a reason, never silently dropped.
    skipped = [r for r in res["dequant"] if r["impl"] in ("triton", "cuda_c")] + res["crossover"]
    assert skipped and all(r["status"] == "skip" and r["note"] for r in skipped)
    assert {(r["impl"], r["level"]) for r in res["dequant"] if r["status"] == "ok"} >= {
        ("torch_reference", "kernel"), ("ours(reference)", "full")}
    impls = {r["impl"] for r in res["linear_fwd_bwd"] if r["status"] == "ok"}
    assert {"ours", "dense"} <= impls
    ms = {r["m"] for r in res["linear_fwd_bwd"]}
    assert len(ms) == 3 and len({(r["k"], r["n"]) for r in res["linear_fwd_bwd"]}) == 2
    assert all("ours_over_dense" in s for s in res["linear_summary"])
    assert any(r["impl"] == "ours" and r["status"] == "ok" and r["gbps"] > 0 for r in res["gemv_m1"])


def test_bnb_columns(dry_run):
    res, _, _ = dry_run
    bnb_rows = [r for r in res["linear_fwd_bwd"] if r["impl"] == "bnb"]
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        assert all(r["status"] == "skip" for r in bnb_rows)
        assert any("bitsandbytes" in n for n in res["notes"])
    else:
        assert bnb_rows and all(r["status"] == "ok" for r in bnb_rows)
        assert all("bnb_over_ours" in s for s in res["linear_summary"])


def test_table_printed_last_and_saved(dry_run):
    _, stdout, out = dry_run
    table = stdout[stdout.index("## peft_kernels GPU suite"):]
    for heading in ("Ceilings:", "### (a)", "### (b)", "### (c)", "### (e)", "### (f)"):
        assert heading in table
    assert (out / "gpu_suite.md").read_text().strip() == table.strip()


def _peft_and_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception:
        return False
    return True


def test_lora_linear_section(dry_run):
    res, _, _ = dry_run
    rows = res["lora_fwd_bwd"]
    assert not [r for r in rows if r["status"] in ("FAIL", "error")]
    assert {r["r"] for r in rows} == {8, 16, 64} and len({(r["k"], r["n"]) for r in rows}) == 2
    # Every timed row checked y and the three gradients (dX, dA, dB).
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and all(f"rel_err_{k}" in r for k in ("y", "dx", "dA", "dB")), r
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"ours", "dense"} <= ok
    peft_rows = [r for r in rows if r["impl"] == "peft"]
    if _peft_and_bnb():
        assert peft_rows and all(r["status"] == "ok" for r in peft_rows)
        assert all("peft_over_ours" in s and "ours_over_dense" in s for s in res["lora_summary"])
    else:
        assert all(r["status"] == "skip" and r["note"] for r in peft_rows)


def test_decoder_layer_section(dry_run):
    res, _, _ = dry_run
    rows = {r["impl"]: r for r in res["decoder_layer"]}
    assert rows["ours"]["status"] == "ok", rows["ours"]
    assert all(f"rel_err_{k}" in rows["ours"] for k in ("y", "dx", "dA", "dB"))
    if _peft_and_bnb():
        assert rows["peft"]["status"] == "ok", rows["peft"]
        assert rows["peft"]["peft_layer"].startswith("peft.tuners.lora.bnb")  # PEFT's QLoRA layer, not plain
        assert rows["ours"]["bnb_bytes_equal_ours"] is True
        assert res["decoder_summary"]["peft_over_ours"] > 0
    else:
        assert rows["peft"]["status"] == "skip"


def test_method_sections(dry_run):
    """Every method section (bench/gpu_sections/) ran: checked, timed rows beside their baseline."""
    res, _, out = dry_run
    baselines = {"bitfit": {"ours", "bnb", "lora_r16"}, "sparse": {"sampled", "dense+gather", "sparse", "lora_r64"},
                 "adapter": {"fused", "unfused"}, "cross_entropy": {"full", "fused", "full_4bit", "fused_4bit"},
                 "multi_lora": {"mixed64", "single", "lora_linear", "peft_mixed"}, "decode": {"copy", "cublas_bf16"},
                 "fused": {"fused", "hf"}, "training_step": {"all_off", "all_on", "L1", "L2"},
                 "memory_switches": {"ours", "dense", "off", "on", "on+offload"}}
    assert set(res["methods"]) == set(baselines)
    for name, impls in baselines.items():
        rows = res["methods"][name]
        assert not [r for r in rows if r["status"] in ("FAIL", "error")], name
        ok = [r for r in rows if r["status"] == "ok"]
        assert {r["impl"] for r in ok} >= impls, name
        assert all(r["ms"] > 0 and any(k.startswith("rel_err") for k in r) for r in ok), name
    table = (out / "gpu_suite.md").read_text()
    assert all(f"({key}) " in table for key in ("g", "h", "i", "j", "k", "l", "m", "n", "o"))
    # section o measures the whole step on CPU too: with every switch on, the estimate is within 10% of it,
    # and so is its per-layer term (the 4-bit kernels' CPU scratch, not modelled, is the all_off gap)
    step = {r["impl"]: r for r in res["methods"]["training_step"]}
    assert step["all_on"]["rel_err_loss_vs_transformers"] <= 1e-5
    assert abs(step["all_on"]["est_over_measured"] - 1) <= 0.10
    assert step["delta"]["status"] == "derived" and abs(step["delta"]["est_over_measured"] - 1) <= 0.10
    dispatch = [r for r in res["methods"]["decode"] if r["impl"] == "dispatch"]
    assert len(dispatch) == 1 and dispatch[0]["written_to"] == ""  # the dry run never writes a table
