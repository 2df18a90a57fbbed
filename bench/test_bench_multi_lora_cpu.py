"""CPU benchmark of a mixed-adapter batch (each sequence its own LoRA adapter): ours vs PEFT's ``adapter_names=``.

Run (times every row, ~30 s on 2 cores):

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_multi_lora_cpu.py --benchmark-only

A small Llama (hidden 256, 2 layers, vocabulary 128, built from a config: no download) with D distinct LoRA
adapters (r = 16 on every linear layer but the head), one forward over a batch in which sequence i uses
adapter i mod D. One pytest-benchmark group per (batch, sequence length, D); rows:

* ``peft``: ``peft.PeftModel`` over the dense fp32 model, every adapter loaded, ``model(ids, adapter_names=)``
  (PEFT 0.21's mixed-batch path: per layer, one sub-batch matmul pair per adapter present);
* ``ours_dense``: ``serving.AdapterPool`` over the same dense model (the same base math as PEFT's);
* ``ours_4bit``: ``AdapterPool`` over the NF4 ``quantize_model`` copy (the serving configuration; on CPU
  the 4-bit weight is dequantized per call, so it is slower than a dense base here — the GPU section ``n``
  of bench/gpu_suite.py is where the 4-bit kernels are measured).

Every row's logits are checked first against a float64 PEFT run of the same model (the 4-bit row against a
float64 copy of the dequantized model), under the project's tolerance policy (``tests/_tolerance.py``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from _saved import load_tolerance

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=1)
_tol = load_tolerance()
CASES = ((8, 16, 8), (16, 1, 16))  # (batch, seq, distinct adapters): a prefill-like and a decode-like batch
R = 16
IMPLS = ("peft", "ours_dense", "ours_4bit")


def _config():
    return transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from peft_kernels.io import save_adapter
    from peft_kernels.methods import lora
    from peft_kernels.quant import quantize_model
    from peft_kernels.serving import AdapterPool

    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(_config()).eval()
    n_ad = max(d for _, _, d in CASES)
    dirs = []
    for i in range(n_ad):
        m = copy.deepcopy(dense)
        torch.manual_seed(100 + i)
        lora.apply(m, lora.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", init_lora_weights=False))
        d = tmp_path_factory.mktemp(f"ad{i}")
        save_adapter(m, d)
        dirs.append(d)
    names = [f"a{i}" for i in range(n_ad)]

    def peft_model(base):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name=names[0])
        for n, d in zip(names[1:], dirs[1:]):
            pm.load_adapter(str(d), adapter_name=n)
        return pm.eval()

    out = {"names": names, "peft": peft_model(dense), "peft64": peft_model(dense).double()}
    ours_dense = copy.deepcopy(dense)
    q4 = copy.deepcopy(dense)
    quantize_model(q4)
    # The 4-bit row's float64 reference: PEFT over a dense copy holding dequant(W4) in float64.
    deq = copy.deepcopy(dense)
    with torch.no_grad():
        for name, mod in q4.named_modules():
            if type(mod).__name__ == "Linear4bit":
                deq.get_submodule(name).weight.copy_(mod.dequantize(torch.float32))
    out["peft64_4bit"] = peft_model(deq).double()
    for key, m in (("ours_dense", ours_dense), ("ours_4bit", q4)):
        pool = AdapterPool(m, slots=n_ad, max_rank=R)
        for n, d in zip(names, dirs):
            pool.load(n, d)
        out[key] = m
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,seq,n_ad", CASES)
def test_mixed_batch_forward(benchmark, models, impl, batch, seq, n_ad):
    from peft_kernels.serving import mixed_adapters

    benchmark.group = f"mixed-adapter forward fp32 batch={batch} seq={seq} adapters={n_ad} r={R}"
    names = [models["names"][i % n_ad] for i in range(batch)]
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))
    model = models[impl]
    if impl == "peft":
        def step():
            with torch.no_grad():
                return model(input_ids=ids, adapter_names=names).logits
    else:
        def step():
            with torch.no_grad(), mixed_adapters(model, names):
                return model(ids).logits
    got = benchmark(step)
    ref_model = models["peft64_4bit" if impl == "ours_4bit" else "peft64"]
    with torch.no_grad():
        want = ref_model(input_ids=ids, adapter_names=names).logits
    err = _tol.rel_error(got, want)
    benchmark.extra_info.update(rel_err_logits=err, threads=torch.get_num_threads(),
                                versions=f"peft {peft.__version__}")
    _tol.assert_close_to_reference(got, want, torch.float32, f"{impl} logits")
