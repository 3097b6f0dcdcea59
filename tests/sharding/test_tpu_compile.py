"""TPU without a TPU: the engine's sharded prefill and decode steps at Llama-3.1 shapes,
compiled by the real TPU compiler for compile-only topologies (libtpu on the CPU host,
runtime/aot.py), and their per-chip memory against the chip's HBM with the KV cache the
server's planner gives that HBM.

  Llama-3.1-8B   TP 8 on v5e:2x4 (16 GiB a chip) and v6e:2x4 (32 GiB)
  Llama-3.1-70B  TP 16 on v5e:4x4 (8 kv heads repeated to 16, one per chip)
  TPU Pallas kernels (flash prefill, paged decode) inside the shard_map, TP 8, on a
  2-layer model of the 8B's head layout (the kernels see the same per-chip shapes).

Each case compiles in a process of its own (`python -m tests.sharding.test_tpu_compile
CASE` prints one JSON line per step), all selected cases side by side: the test process
keeps its one CPU device and never loads libtpu, and the TPU compiler is mostly one
thread (most of a step's compile is the sampler's sort over the 128k vocabulary). The
Llama cases take minutes on two cores: slow.

That the abstract arguments are the engine's own is checked on a CPU mesh: the steps
runtime/aot.py lowers are the very programs a real Engine lowers (same StableHLO).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.sampling import SAMPLING_MODES

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
HBM = {"v5e": 16 * GiB, "v6e": 32 * GiB}
# One prefill bucket and one decode shape: what the compiler's work scales with is
# per step, not per bucket, and every bucket is the same program at another size.
ECFG = dict(max_num_seqs=8, max_model_len=8192, prefill_lengths=(512,), prefill_batch_sizes=(1,),
            decode_steps_per_call=1)
CASES = {
    "8b-v5e": dict(model="llama3.1-8b", topology="v5e:2x4", tp=8),
    "8b-v6e": dict(model="llama3.1-8b", topology="v6e:2x4", tp=8),
    "8b-int8-v5e": dict(model="llama3.1-8b", topology="v5e:2x4", tp=8, quantization="int8"),
    "70b-v5e": dict(model="llama3.1-70b", topology="v5e:4x4", tp=16),
    # max_model_len 512: prompts never chunk, so the Pallas path's one prefill is the fresh one.
    "pallas-v5e": dict(model="llama3.1-8b", topology="v5e:2x4", tp=8, attention="pallas", layers=2,
                       vocab=1024, max_model_len=512, all_sampling_modes=True),
    # An int8 KV cache (QuantizedPages: values and [P, K, S] scales) through the decode
    # kernel, one kv head per chip.
    "pallas-int8kv-v5e": dict(model="llama3.1-8b", topology="v5e:2x4", tp=8, attention="pallas", layers=2,
                              vocab=1024, max_model_len=512, cache_dtype="int8"),
    # One chip: the engine also runs mixed calls (a decode step beside a prefill chunk),
    # with both TPU kernels in one program.
    "mixed-v5e1": dict(model="llama3.1-8b", topology="v5e:1x1", tp=1, attention="pallas", layers=2, vocab=1024,
                       max_model_len=512),
}


# ---------------------------------------------------------------------------------
# The subprocess


def compile_case(name: str) -> None:
    import jax

    from runtime import aot
    from runtime.config import EngineConfig
    from runtime.presets import preset_config
    from sharding.mesh import MeshConfig, check_model, make_mesh

    case = CASES[name]
    cfg = preset_config(case["model"])
    if "layers" in case:
        cfg = dataclasses.replace(cfg, num_layers=case["layers"], layer_windows=cfg.layer_windows[:case["layers"]],
                                  vocab_size=case["vocab"])
    ecfg = EngineConfig(**{**ECFG, "attention": case.get("attention", "auto"),
                           "max_model_len": case.get("max_model_len", ECFG["max_model_len"]),
                           "quantization": case.get("quantization"),
                           "cache_dtype": case.get("cache_dtype", "bfloat16")})
    mesh_config = MeshConfig(tensor=case["tp"])
    check_model(cfg, mesh_config)
    t0 = time.perf_counter()
    mesh = make_mesh(mesh_config, devices=aot.topology_devices(case["topology"]))
    engine = aot.abstract_engine(cfg, ecfg, mesh)
    whole = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), engine.params)  # unsplit
    print(json.dumps(dict(
        case=name, setup_s=time.perf_counter() - t0, hbm=aot.hbm_bytes(mesh.devices.flat[0]),
        kv_heads=engine.cfg.num_kv_heads, num_pages=engine.num_pages, page_bytes=engine.capacity.page_bytes,
        max_pages_per_seq=engine.capacity.max_pages_per_seq, cache_spec=str(jax.tree.leaves(engine.cache.k[0])[0].sharding.spec),
        param_bytes=aot.abstract_bytes_per_device(whole), param_bytes_per_device=engine.param_bytes_per_device,
        cache_bytes_per_device=engine.cache_bytes_per_device, slots_bytes=aot.abstract_bytes_per_device(engine.slots),
        manifest=engine.manifest(),
        weight_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(engine.params["layers"])}),
    )), flush=True)
    # Decode over every slot in the "filter" sampling mode only (its vocabulary sort makes
    # it the largest and slowest to compile: ~14 s at 8B; smaller buckets are the same
    # program on fewer rows), except where the case asks for every mode.
    manifest = engine.manifest()
    entries = {"prefill": manifest["prefill"],
               "decode": [d for d in manifest["decode"] if d[0] == ecfg.max_num_seqs
                          and (case.get("all_sampling_modes") or d[1] == "filter")],
               "mixed": [m for m in manifest["mixed"] if m[0] == ecfg.max_num_seqs]}  # one device only
    for step in aot.compile_manifest(engine, entries, release=False):
        hlo = step.compiled.as_text()
        print(json.dumps(dict(
            case=name, kind=step.kind, shape=step.shape, memory=dataclasses.asdict(step.memory),
            lower_s=step.lower_s, compile_s=step.compile_s, all_reduce=hlo.count("all-reduce"),
            kernels=[k for k in ("paged_attention_decode", "flash_attention_causal") if k in hlo],
            # Copies of an argument (a weight in another layout: XLA relays it on every call).
            weight_copies=[line.strip()[:160] for line in hlo.splitlines()
                           if " copy(" in line and 'op_name="params[' in line],
        )), flush=True)


def match_engine() -> None:
    """A real Engine (tiny model, TP 4 on simulated CPU devices) and runtime/aot.py
    lower every manifest entry; prints whether the programs are the same."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from runtime import aot
    from runtime.config import EngineConfig
    from runtime.engine import MAX_STOP_IDS, Engine, pack_prefill
    from runtime.models.transformer import Transformer
    from runtime.presets import preset_config
    from runtime.sampling import SlotSampling
    from sharding.mesh import MeshConfig, cache_sharding, make_mesh, place_model, replicate_kv_heads

    cfg = preset_config("tiny-llama")  # 2 kv heads: repeated to 4
    ecfg = EngineConfig(max_model_len=64, prefill_lengths=(16, 32), prefill_batch_sizes=(1, 2), max_num_seqs=4,
                        decode_steps_per_call=2, num_top_logprobs=2)
    mesh = make_mesh(MeshConfig(tensor=4))
    model = replicate_kv_heads(place_model(Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), mesh), mesh)
    engine = Engine(model, ecfg, num_pages=8, cache_sharding=cache_sharding(model.cfg, 8, ecfg.page_size, mesh))
    abstract = aot.abstract_engine(cfg, ecfg, mesh, num_pages=8)
    MP, B = ecfg.max_pages_per_seq, ecfg.max_num_seqs
    z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    state = (engine.param_leaves, engine.cache, engine.slots)
    rows = []
    for kind, shapes in {**engine.manifest(), **{k: [()] for k in aot.SLOT_PROGRAMS}}.items():
        for shape in shapes:
            if kind == "prefill":
                b, t = shape[:2]
                packed = pack_prefill(
                    tokens=z(b, t), starts=z(b), lens=z(b), page_table=z(b, MP), slot_ids=z(b) + B,
                    is_last=np.zeros(b, bool), sampling=SlotSampling.pack([None] * b, [0] * b),
                    stop_ids=z(b, MAX_STOP_IDS) - 1, remaining=z(b))
                real = engine._prefill["fresh" in shape].lower(*state, *packed)
            elif kind == "decode":
                real = engine._decode[tuple(shape)].lower(*state, engine.io)
            elif kind == "release":
                real = engine._release.lower(engine.slots, jnp.asarray(B, jnp.int32))
            else:
                real = engine._seed_prompt_mask.lower(engine.slots, jnp.asarray(B, jnp.int32), z(MP * ecfg.page_size))
            step = aot.step_fn(abstract, kind, shape)
            same = real.as_text() == step.lower(*aot.step_args(abstract, kind, shape)).as_text()
            rows.append(dict(kind=kind, shape=shape, same=same))
    print(json.dumps(dict(kv_heads=abstract.cfg.num_kv_heads, steps=rows)), flush=True)


# ---------------------------------------------------------------------------------
# The tests


def test_aot_lowers_the_engines_programs():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    p = subprocess.run([sys.executable, "-m", "tests.sharding.test_tpu_compile", "engine-match"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["kv_heads"] == 4
    assert {(r["kind"], tuple(r["shape"])) for r in out["steps"]} == {
        ("prefill", (1, 16)), ("prefill", (1, 32)), ("prefill", (2, 16)), ("prefill", (2, 32)),
        *(("decode", (b, mode)) for b in (1, 4) for mode in SAMPLING_MODES), ("release", ()), ("seed_prompt_mask", ())}  # buckets 1 and 4
    assert all(r["same"] for r in out["steps"]), out["steps"]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Starts every selected test's case at once; `runs(name)` waits for one and returns
    (its setup line, its steps' lines)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'libtpu==0.0.42.*', the version jax 0.10.2 pins)")
    out = tmp_path_factory.mktemp("tpu_compile")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    selected = [item.callspec.params["case"] for item in request.session.items
                if "runs" in getattr(item, "fixturenames", ())
                and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    procs = {}
    for name in dict.fromkeys(selected):
        with open(out / f"{name}.out", "w") as stdout, open(out / f"{name}.err", "w") as stderr:
            procs[name] = subprocess.Popen([sys.executable, "-m", "tests.sharding.test_tpu_compile", name],
                                           stdout=stdout, stderr=stderr, cwd=ROOT, env=env)
    results = {}

    def wait(name):
        if name not in results:
            rc = procs[name].wait(timeout=1500)
            err = (out / f"{name}.err").read_text()
            assert rc == 0, f"{name}: exit {rc}\n{err[-4000:]}"
            lines = [json.loads(x) for x in (out / f"{name}.out").read_text().splitlines() if x.startswith("{")]
            results[name] = (lines[0], lines[1:])
        return results[name]

    yield wait
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _check_no_weight_copies(steps: list[dict]) -> None:
    """No step copies a weight into another layout (the fused projections are stored in
    the TPU's: runtime.models.layers.QKV_LAYOUTS; [D, 2, F] gate/up was relaid per call)."""
    for step in steps:
        assert step["weight_copies"] == [], (step["kind"], step["shape"], step["weight_copies"])


def _check_fits(info: dict, steps: list[dict], tp: int) -> None:
    # The weights are split: each chip holds about 1/TP of them (norms are replicated;
    # "param_bytes" counts repeated kv heads, as placed).
    assert info["param_bytes_per_device"] < 1.05 * info["param_bytes"] / tp, info
    # The planned cache is on every chip as planned: pages x the planner's per-chip page bytes.
    assert info["cache_bytes_per_device"] == info["num_pages"] * info["page_bytes"], info
    assert info["num_pages"] >= info["max_pages_per_seq"]
    state = info["param_bytes_per_device"] + info["cache_bytes_per_device"] + info["slots_bytes"]
    for step in steps:
        m, where = step["memory"], f"{info['case']} {step['kind']} {step['shape']}"
        assert step["all_reduce"] > 0, f"{where}: no cross-chip reduction (not tensor parallel)"
        # The compiled step's arguments are the split weights, the chip's cache and slots
        # and the call's small inputs: nothing was gathered whole into an argument.
        assert state <= m["argument"] <= state + (16 << 20), (where, m, state)
        # The cache and slots are updated in place (donated): outputs alias them.
        assert m["output"] - m["alias"] < (64 << 20), (where, m)
        assert m["argument"] + m["temp"] <= info["hbm"], (where, m)
        assert m["argument"] + m["temp"] + m["output"] - m["alias"] <= info["hbm"], (where, m)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["8b-v5e", "8b-v6e"])
def test_llama8b_tp8(runs, case):
    info, steps = runs(case)
    assert info["hbm"] == HBM[CASES[case]["topology"].split(":")[0]]
    assert info["kv_heads"] == 8 and "'tensor'" in info["cache_spec"]
    assert {(s["kind"], tuple(s["shape"])) for s in steps} == {("prefill", (1, 512)), ("decode", (8, "filter"))}
    _check_fits(info, steps, 8)
    _check_no_weight_copies(steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["8b-int8-v5e"])
def test_llama8b_int8_tp8(runs, case):
    """int8 projections (runtime.quantization) compile for the TPU with the weights read
    as stored: int8 arguments, no copy of a weight, each chip holding a bit over half
    the bf16 bytes (embeddings, norms and the float32 scales stay wider)."""
    info, steps = runs(case)
    assert info["weight_dtypes"] == ["bfloat16", "float32", "int8"]
    assert 0.5 * 16.06e9 < info["param_bytes"] < 0.6 * 16.06e9, info["param_bytes"]
    assert {(s["kind"], tuple(s["shape"])) for s in steps} == {("prefill", (1, 512)), ("decode", (8, "filter"))}
    _check_fits(info, steps, 8)
    _check_no_weight_copies(steps)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["70b-v5e"])
def test_llama70b_tp16_kv_heads_repeated(runs, case):
    info, steps = runs(case)
    assert info["hbm"] == HBM["v5e"]
    assert info["kv_heads"] == 16 and "'tensor'" in info["cache_spec"]  # 8 repeated to one per chip
    assert {(s["kind"], tuple(s["shape"])) for s in steps} == {("prefill", (1, 512)), ("decode", (8, "filter"))}
    _check_fits(info, steps, 16)
    _check_no_weight_copies(steps)


@pytest.mark.parametrize("case", ["pallas-v5e"])
def test_tpu_pallas_kernels_inside_shard_map(runs, case):
    _, steps = runs(case)
    by_kind = {(s["kind"], tuple(s["shape"])): s for s in steps}
    assert set(by_kind) == {("prefill", (1, 512, "fresh")), *(("decode", (8, mode)) for mode in SAMPLING_MODES)}
    assert by_kind["prefill", (1, 512, "fresh")]["kernels"] == ["flash_attention_causal"]
    for mode in SAMPLING_MODES:
        assert by_kind["decode", (8, mode)]["kernels"] == ["paged_attention_decode"]
    assert all(s["all_reduce"] > 0 for s in steps)
    _check_no_weight_copies(steps)


@pytest.mark.parametrize("case", ["pallas-int8kv-v5e"])
def test_tpu_decode_kernel_reads_quantized_pages(runs, case):
    """An int8 KV cache under TP 8 on v5e: the decode step runs the Pallas kernel on each
    chip's QuantizedPages (one kv head: [P, S, 1, H] values, [P, 1, S] scales) with the
    cache read in place: the step's arguments are the planned state (values and scales
    at their raw bytes: no padded layout) and no temporary holds a copy of it."""
    info, steps = runs(case)
    assert "'tensor'" in info["cache_spec"]
    by_kind = {(s["kind"], tuple(s["shape"])): s for s in steps}
    assert by_kind["decode", (8, "filter")]["kernels"] == ["paged_attention_decode"]
    assert by_kind["prefill", (1, 512, "fresh")]["kernels"] == ["flash_attention_causal"]
    # 2 layers x K and V x 1 kv head x (128 values + a 4-byte scale) per token.
    assert info["page_bytes"] == 2 * 2 * (128 + 4) * 16, info["page_bytes"]
    _check_fits(info, steps, 8)
    for s in steps:
        assert s["memory"]["temp"] < info["cache_bytes_per_device"] // 8, (s["kind"], s["memory"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixed-v5e1"])
def test_tpu_mixed_call_on_one_chip(runs, case):
    """A sharded engine makes no mixed calls (the manifests above have none); on one chip
    the mixed call compiles for the TPU with the decode and flash kernels in one program."""
    info, steps = runs(case)
    assert info["manifest"]["mixed"] == [[1, 1, 512, "fresh"], [8, 1, 512, "fresh"]]
    by_kind = {(s["kind"], tuple(s["shape"])): s for s in steps}
    assert set(by_kind) == {("prefill", (1, 512, "fresh")), ("decode", (8, "filter")), ("mixed", (8, 1, 512, "fresh"))}
    assert sorted(by_kind["mixed", (8, 1, 512, "fresh")]["kernels"]) == ["flash_attention_causal",
                                                                         "paged_attention_decode"]
    m = by_kind["mixed", (8, 1, 512, "fresh")]["memory"]
    assert m["output"] - m["alias"] < (64 << 20), m  # the cache and slots updated in place
    # One chip: the fused weights in the TPU's layout and the pages read in place.
    _check_no_weight_copies(steps)
    for step in steps:
        assert step["memory"]["temp"] < info["cache_bytes_per_device"] // 16, step


if __name__ == "__main__":
    match_engine() if sys.argv[1] == "engine-match" else compile_case(sys.argv[1])
