"""Multi-process training over 4-bit bases (peft_kernels/train/distributed.py): DDP and FSDP2 (fully_shard).

Two torchrun launches of 2 CPU processes (gloo), each running DDP then FSDP2 in one process group
(tests/_dist_worker.py); the loop launch also runs FSDP2 with ``shard_frozen=False``:

* the worker's own loop (SGD with momentum, so the gradient's scale matters; gradient checkpointing on in
  the ranks, off in the reference): the global loss of every step and the final adapters must equal ONE
  process trained on the concatenated batch (fp32 tolerance) — the gradient averaging is right — and
  controls show the comparison would catch a sum instead of a mean, or a missing all-reduce; every rank ends with bit-identical adapters (the worker's ``adapters_identical`` and
  the test's own comparison of both ranks' files); the 4-bit bytes are unchanged; under FSDP2 the packed
  uint8 weights really are sharded (half the bytes per rank) while the fused 4-bit op sees the whole,
  plain ``[(N*K+1)//2, 1]`` tensor, in forward and in the backward recomputation;
* ``peft_kernels.train.trainer.Trainer`` with ``TrainConfig(distributed=...)``: the same losses and adapters as
  a single-process Trainer seeing the same batches (``grad_accum=2``), with examples of different lengths (the
  ranks hold different numbers of label tokens) and gradient clipping on; the checkpoint's adapter loads
  back to the trained values.

FSDP2 runs on CPU/gloo with torch 2.13, so no GPU-only variant is needed. Plus in-process checks of the API
in a single process and of its errors.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import _dist_worker as W
from _tolerance import REL_TOL, assert_close_to_reference, rel_error
from peft_kernels.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
STRATEGIES = ("ddp", "fsdp2")
#: the loop also runs FSDP2 with shard_frozen=False (4-bit bases replicated, only the rest sharded)
LOOP_STRATEGIES = STRATEGIES + ("fsdp2-replicated",)
STEPS = 4
NPROC = 2
LAUNCH_TIMEOUT_S = 150  # a run takes ~15 s of CPU; the limit only stops a hung launch on a busy machine
HAS_TRAINER = importlib.util.find_spec("peft_kernels.train.trainer") is not None


# ============================================================================ launching
def _launch(out: Path, runner: str, strategies: tuple, *args: str) -> dict:
    """torchrun 2 processes of the worker; returns {strategy: [rank0 result, rank1 result]} (each the JSON plus
    ``state``, that rank's trainable tensors). Fails with the worker's error or output tail."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--standalone",
           str(WORKER), "--runner", runner, "--strategies", ",".join(strategies), "--out", str(out),
           "--steps", str(STEPS), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s: {' '.join(cmd)}\n{(e.stdout or '')[-3000:]}")
    wall = time.perf_counter() - t0
    results: dict = {}
    errors = []
    for s in strategies:
        ranks = []
        for r in range(NPROC):
            f = out / f"{runner}_{s}_rank{r}.json"
            if not f.exists():
                continue
            res = json.loads(f.read_text())
            if "error" in res:
                errors.append(f"--- {s} rank {r}:\n{res['error']}")
                continue
            res["state"] = load_file(str(f.with_suffix(".safetensors")))
            ranks.append(res)
        results[s] = ranks
    results["_info"] = {"returncode": proc.returncode, "errors": errors, "wall_s": wall,
                        "output": (proc.stdout + proc.stderr)[-4000:]}
    print(f"torchrun {runner}: rc {proc.returncode}, {wall:.1f} s wall")
    return results


def _ranks(results: dict, strategy: str) -> list[dict]:
    info = results["_info"]
    ranks = results[strategy]
    if len(ranks) != NPROC:
        detail = "\n".join(info["errors"]) or info["output"]
        pytest.fail(f"{strategy}: {len(ranks)} of {NPROC} ranks finished (torchrun rc {info['returncode']}):\n{detail}")
    return ranks


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in sorted(state)])


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("dist_loop"), "loop", LOOP_STRATEGIES, "--grad-ckpt")


@pytest.fixture(scope="module")
def loop_reference():
    """One process, the whole global batch each step (without the ranks' gradient checkpointing: it must not
    change the numbers either), plus the controls and the starting point."""
    ref_model = W.build_model()
    init = _trainable(ref_model)
    losses = W.train_loop(ref_model, STEPS, lambda s: W.global_batch(s, NPROC))
    summed = W.build_model()  # what DDP would give if it summed the ranks' gradients instead of averaging
    W.train_loop(summed, STEPS, lambda s: W.global_batch(s, NPROC), grad_scale=NPROC)
    alone = W.build_model()  # rank 0 with no gradient exchange at all
    W.train_loop(alone, STEPS, lambda s: W.rank_batch(s, NPROC, 0))
    return {"losses": losses, "state": _trainable(ref_model), "init": init, "summed": _trainable(summed),
            "alone": _trainable(alone), "digest": W.base_digest(W.build_model())}


# ============================================================================ the worker's loop
def _check_common(ranks: list[dict], digest: str, strategy: str) -> None:
    """Finite, falling, rank-consistent losses; identical adapters on every rank; 4-bit bytes unchanged."""
    for r in ranks:
        assert r["world"] == NPROC and r["strategy"] == strategy
        losses = r["losses"]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0] - 0.05, f"{strategy} rank {r['rank']}: loss did not fall: {losses}"
        assert r["identical"] is True, f"{strategy}: adapters_identical returned False on rank {r['rank']}"
        assert r["base_digest"] == digest, f"{strategy} rank {r['rank']}: the 4-bit base bytes changed"
    assert ranks[0]["losses"] == ranks[1]["losses"], "the logged global loss differs between ranks"
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert sorted(s0) == sorted(s1)
    diff = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not diff, f"{strategy}: ranks' adapters differ in {diff[:3]}"


@pytest.mark.parametrize("strategy", LOOP_STRATEGIES)
def test_loop_matches_one_process_on_the_concatenated_batch(strategy, loop_runs, loop_reference):
    ranks = _ranks(loop_runs, strategy)
    ref = loop_reference
    _check_common(ranks, ref["digest"], strategy)
    # every step's global loss (the mean of the ranks' losses, via all_reduce_mean) is the one-process loss
    for r in ranks:
        mean_local = [(a + b) / 2 for a, b in zip(ranks[0]["local_losses"], ranks[1]["local_losses"])]
        assert rel_error(torch.tensor(r["losses"]), torch.tensor(mean_local)) <= REL_TOL[torch.float32]
    assert_close_to_reference(torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), torch.float32,
                              f"{strategy} global losses")
    got = ranks[0]["state"]
    assert sorted(got) == sorted(ref["state"]) and any("lora_A" in k for k in got)
    for name in sorted(ref["state"]):
        assert_close_to_reference(got[name], ref["state"][name], torch.float32, f"{strategy} {name}")
    # the comparison can fail: training moved the adapters far beyond the tolerance, and the two wrong
    # ways of combining the ranks land far from the result
    tol = REL_TOL[torch.float32]
    moved = rel_error(_flat(ref["init"]), _flat(ref["state"]))
    assert moved > 1e4 * tol, f"adapters hardly moved ({moved:.2e}): the comparison would be vacuous"
    for control in ("summed", "alone"):
        err = rel_error(_flat(ref[control]), _flat(ref["state"]))
        assert err > 100 * tol, f"control {control!r} is only {err:.2e} from the reference"


def test_fsdp2_shards_the_4bit_weights_and_ops_see_them_whole(loop_runs):
    for strategy in LOOP_STRATEGIES:
        for r in _ranks(loop_runs, strategy):
            seen, base, adapter = r["seen"], r["shards"]["base"], r["shards"]["adapter"]
            # what the fused 4-bit op got at every forward and at every recomputation in backward (gradient
            # checkpointing): the plain, whole packed tensor
            assert r["gradient_checkpointing"] is True
            assert seen["forward_types"] == ["Parameter"] * (2 * STEPS), seen
            assert seen["forward_shape"] == seen["expected_shape"] and seen["forward_dtype"] == "torch.uint8"
            assert base["dtype"] == "torch.uint8" and base["numel"] == seen["expected_shape"][0]
            whole_base = {**base, "type": "Parameter", "local_numel": base["numel"]}
            if strategy == "ddp":  # replicated: every rank holds everything, as plain parameters
                assert base == whole_base
                assert adapter["type"] == "Parameter" and adapter["local_numel"] == adapter["numel"]
            else:  # sharded along dim 0: each rank keeps half of the adapter (and of the packed bytes)
                assert adapter["type"] == "DTensor" and adapter["local_numel"] == adapter["numel"] // NPROC
                if strategy == "fsdp2":
                    assert base["type"] == "DTensor" and base["local_numel"] == base["numel"] // NPROC
                else:  # shard_frozen=False: the 4-bit bases stay whole, outside FSDP
                    assert base == whole_base


# ============================================================================ through the Trainer
@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    if not HAS_TRAINER:
        pytest.skip("peft_kernels/train/trainer.py does not exist yet")
    return _launch(tmp_path_factory.mktemp("dist_trainer"), "trainer", STRATEGIES, "--save")


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory):
    if not HAS_TRAINER:
        pytest.skip("peft_kernels/train/trainer.py does not exist yet")
    assert not D.is_initialized()
    res = W.run_trainer(None, STEPS, tmp_path_factory.mktemp("trainer_ref"), world=1, grad_accum=NPROC)
    return {"losses": res["losses"], "state": _trainable(res["model"]), "digest": W.base_digest(W.build_model())}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trainer_matches_one_process(strategy, trainer_runs, trainer_reference):
    from peft_kernels.methods.registry import load_adapters

    ranks = _ranks(trainer_runs, strategy)
    ref = trainer_reference
    _check_common(ranks, ref["digest"], strategy)
    assert_close_to_reference(torch.tensor(ranks[0]["losses"]), torch.tensor(ref["losses"]), torch.float32,
                              f"Trainer {strategy} losses")
    got = ranks[0]["state"]
    assert sorted(got) == sorted(ref["state"])
    for name in sorted(ref["state"]):
        assert_close_to_reference(got[name], ref["state"][name], torch.float32, f"Trainer {strategy} {name}")
    # rank 0's checkpoint holds the trained adapter, loadable into a fresh model
    ckpt = ranks[0]["checkpoint"]
    assert ckpt and ranks[1]["checkpoint"] == ckpt
    loaded = dict(load_adapters(W.build_model(), Path(ckpt) / "adapter").named_parameters())
    for name, t in got.items():
        assert torch.equal(loaded[name].detach(), t), f"checkpoint adapter {name} differs from the trained one"


# ============================================================================ API in one process
@pytest.fixture
def no_launcher_env(monkeypatch):
    for k in D.LAUNCH_ENV + ("LOCAL_RANK",):
        monkeypatch.delenv(k, raising=False)
    assert not D.is_initialized()


def test_single_process_api(no_launcher_env):
    assert D.init_from_env() is False and not D.is_initialized()
    assert (D.world_size(), D.rank(), D.local_rank(), D.is_main()) == (1, 0, 0, True)
    D.barrier()
    t = torch.tensor([3, 4])
    m = D.all_reduce_mean(t)
    assert m.dtype == torch.float64 and torch.equal(m, torch.tensor([3.0, 4.0], dtype=torch.float64))
    x = torch.tensor([1.5])
    y = D.all_reduce_mean(x)
    y += 1
    assert x.item() == 1.5, "all_reduce_mean must not alias its input"
    model = W.build_model()
    assert D.strategy_of(model) is None and D.unwrap_model(model) is model
    assert D.adapters_identical(model) is True
    state = D.trainable_state(model)
    assert state and all(k.endswith(".weight") and ("lora_A" in k or "lora_B" in k) for k in state)
    with D.no_sync(model), D.gathered_params(model) as inner:
        assert inner is model
    with pytest.raises(TypeError, match="tensor"):
        D.all_reduce_mean(3.0)


def test_init_from_env_rejects_a_partial_launch_env(no_launcher_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT missing"):
        D.init_from_env()
    assert not D.is_initialized()


def test_wrap_model_needs_a_known_strategy_and_a_process_group(no_launcher_env):
    model = W.build_model()
    with pytest.raises(ValueError, match=r"unknown distributed strategy 'zero3'.*'ddp', 'fsdp2'"):
        D.wrap_model(model, "zero3")
    with pytest.raises(RuntimeError, match="init_from_env"):
        D.wrap_model(model, "ddp")


@pytest.fixture
def one_rank_group(no_launcher_env, tmp_path):
    """A real gloo process group of one rank in this process, torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_wrap_model_refuses_bad_models(one_rank_group):
    frozen = W.build_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        D.wrap_model(frozen, "ddp")
    mixed = W.build_model()
    lora_b = next(m for n, m in mixed.named_modules() if n.endswith("lora_B.default"))
    lora_b.to(torch.float64)
    with pytest.raises(ValueError, match=r"one dtype, got torch.float32, torch.float64.*lora_B"):
        D.wrap_model(mixed, "fsdp2")
    on_meta = W.build_model()
    on_meta.lm_head.to("meta")
    with pytest.raises(ValueError, match="meta device.*lm_head"):
        D.wrap_model(on_meta, "ddp")
    wrapped = D.wrap_model(W.build_model(), "ddp")
    assert D.strategy_of(wrapped) == "ddp" and isinstance(D.unwrap_model(wrapped), nn.Module)
    with pytest.raises(ValueError, match="already wrapped"):
        D.wrap_model(wrapped, "fsdp2")


def test_one_rank_wrapping_trains_like_the_plain_model(one_rank_group):
    """With one rank both wrappers must be exact no-ops on the numbers (no rescaling, no stale parameters)."""
    ref = W.build_model()
    ref_losses = W.train_loop(ref, 2, lambda s: W.global_batch(s, 1))
    for strategy in STRATEGIES:
        wrapped = D.wrap_model(W.build_model(), strategy)
        assert D.strategy_of(wrapped) == strategy
        losses = W.train_loop(wrapped, 2, lambda s: W.global_batch(s, 1))
        assert_close_to_reference(torch.tensor(losses), torch.tensor(ref_losses), torch.float32, strategy)
        got = D.trainable_state(wrapped)
        for name, t in _trainable(ref).items():
            assert_close_to_reference(got[name], t, torch.float32, f"{strategy} {name}")
        assert D.adapters_identical(wrapped)
