"""python -m runtime.generate --checkpoint=DIR|ALIAS --prompt=TEXT [--prompt=...] [flags]

Generates for every prompt through the same orchestrator loop the server uses.
--format=text prints the first prompt and streams its completion as it is generated
(further prompts print in turn after it); --format=jsonl prints one JSON object per prompt.
Without --max_num_seqs there is one decode slot per prompt, up to 8 (fewer slots, fewer
decode programs to compile). Sampling flags left unset
take the checkpoint's generation_config.json defaults where it has them, as in serve.
A prompt that fails on its own prints its error; the others finish; exit code 1.
Several processes (hosts): as runtime.serve (--coordinator_address, --num_processes,
--process_id); process 0 reads the prompts and prints, the others make its engine calls.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags
from absl import logging as absl_logging

from runtime import flags as xflags
from runtime.chat_template import ChatTemplateError
from runtime.config import AUTO_MIN_NUM_SEQS, ConfigError
from runtime.orchestrator import Orchestrator, Request, RequestError
from runtime.sampling import SamplingError, SamplingParams

flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (JSON string lines allowed).")
flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message in the model's chat template.")
flags.DEFINE_integer("max_tokens", 128, "Tokens to generate per prompt at most.")
flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
flags.DEFINE_integer("top_k", 0, "0 disables.")
flags.DEFINE_float("top_p", 1.0, "1 disables.")
flags.DEFINE_float("min_p", 0.0, "0 disables.")
flags.DEFINE_float("repetition_penalty", 1.0, "1 disables.")
flags.DEFINE_float("presence_penalty", 0.0, "0 disables.")
flags.DEFINE_float("frequency_penalty", 0.0, "0 disables.")
flags.DEFINE_integer("seed", None, "Sampling seed (prompt i uses seed + i).")
flags.DEFINE_integer("logprobs", None, "Report the top-N logprobs per step (jsonl).")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Output format.")
xflags.define_engine_flags()
xflags.define_distributed_flags()
FLAGS = flags.FLAGS
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


def _read_prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        try:
            with open(FLAGS.prompts_file, encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        prompts.append(json.loads(line) if line.startswith('"') else line)
        except OSError as e:
            xflags.usage_error(f"--prompts_file: {e.strerror}: {FLAGS.prompts_file}")
    if not prompts:
        xflags.usage_error("give at least one --prompt or a --prompts_file")
    return prompts


def _sampling_params(checkpoint_defaults: dict) -> SamplingParams:
    """The sampling flags; those not given on the command line take the checkpoint's
    generation_config.json defaults where it has them."""
    given = {name: FLAGS[name].value for name in _SAMPLING_FLAGS if FLAGS[name].present}
    taken = {k: v for k, v in checkpoint_defaults.items() if k not in given}
    if taken:
        print("sampling defaults from the checkpoint's generation_config.json: "
              + ", ".join(f"{k}={v}" for k, v in taken.items()), file=sys.stderr, flush=True)
    values = {name: FLAGS[name].value for name in _SAMPLING_FLAGS} | taken
    return SamplingParams(**values, logprobs=FLAGS.logprobs)


def main(argv: list[str]) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # checkpoint restore logs at INFO
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint:
        xflags.usage_error("--checkpoint is required (a directory or an alias such as gemma3-270m)")
    prompts = _read_prompts()
    try:
        groups = max(1, FLAGS.data_parallel_size)  # every data-parallel group gets as many slots
        n = -(-min(len(prompts), AUTO_MIN_NUM_SEQS) // groups) * groups
        slots = {"max_num_seqs": n} if xflags.auto_num_seqs() else {}
        ecfg = xflags.engine_config_from_flags(
            num_top_logprobs=max(FLAGS.num_top_logprobs, FLAGS.logprobs or 0), **slots
        )
        mesh_config = xflags.mesh_config_from_flags()
        dist = xflags.distributed_config_from_flags()
        _sampling_params({})  # bad sampling flags fail before the model loads
    except (ConfigError, SamplingError) as e:
        xflags.usage_error(str(e))

    from checkpoints.errors import CheckpointError
    from runtime.startup import CapacityError, load_engine
    from sharding import distributed

    cluster, mesh_config = xflags.join_cluster(dist, mesh_config)
    if cluster is not None and not cluster.is_leader:
        def report(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2 if isinstance(e, (CheckpointError, CapacityError, ConfigError)) else 1

        sys.exit(distributed.follow(cluster, lambda: load_engine(FLAGS.checkpoint, ecfg, dtype=FLAGS.dtype,
                                                                  mesh_config=mesh_config)[0], report=report))
    leader = distributed.Leader(cluster) if cluster is not None else None
    try:
        engine, tokenizer = load_engine(FLAGS.checkpoint, ecfg, dtype=FLAGS.dtype, mesh_config=mesh_config)
        if leader is not None:
            engine = leader.attach(engine)
    except (CheckpointError, CapacityError, ConfigError) as e:
        _exit_cluster(leader, f"error: {e}", 2)
    try:
        code = _generate(engine, tokenizer, prompts)
    except SystemExit as e:  # a bad prompt or flag: usage_error
        code = e.code if isinstance(e.code, int) else 1
    if leader is not None:
        code = leader.finish(code)  # stops the other processes; exits at once unless 0
    sys.exit(code)


def _exit_cluster(leader, message: str, code: int) -> "NoReturn":  # noqa: F821
    print(message, file=sys.stderr, flush=True)
    if leader is not None:
        leader.finish(code)
    sys.exit(code)


def _generate(engine, tokenizer, prompts: list[str]) -> int:
    """Runs the prompts and prints the outputs; returns the exit code."""
    try:
        base = _sampling_params(engine.sampling_defaults)
    except SamplingError as e:
        xflags.usage_error(str(e))
    sampling = [dataclasses.replace(base, seed=None if FLAGS.seed is None else FLAGS.seed + i)
                for i in range(len(prompts))]
    orc = Orchestrator(engine, tokenizer)
    requests = []
    for i, (text, sp) in enumerate(zip(prompts, sampling)):
        if FLAGS.chat:
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            except (ValueError, ChatTemplateError) as e:
                xflags.usage_error(str(e))
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(text)
        req = Request(
            request_id=str(i), prompt_ids=ids, sampling=sp, max_tokens=FLAGS.max_tokens,
            stop=tuple(FLAGS.stop), ignore_eos=FLAGS.ignore_eos,
        )
        try:
            orc.validate(req)
        except RequestError as e:
            xflags.usage_error(f"prompt {i}: {e}")
        requests.append(req)
    import jax

    if jax.process_count() == 1:  # several processes compile in step, at warm-up
        from runtime import aot

        # Compiled on one thread per core (up to 8) side by side, not one after another
        # inside warm-up, as serve and warmup do (the README's first command on 2 cores with a
        # cold compile cache: 176 s -> 128 s).
        engine.use_executables(aot.compile_programs(engine.programs(), aot.default_compile_threads(
            jax.devices()[0].platform)))
    engine.warmup()
    orc.mark_ready()
    for req in requests:
        orc.add_request(req)

    results = {r.request_id: dict(token_ids=[], text="", logprobs=[], top_logprobs=[]) for r in requests}
    stream_id = requests[0].request_id if FLAGS.format == "text" else None
    if stream_id is not None and not FLAGS.chat:  # the completion reads on from its prompt
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    while orc.has_work():
        for out in orc.step():
            res = results[out.request_id]
            res["token_ids"] += out.token_ids
            res["text"] += out.text
            res["logprobs"] += out.logprobs
            res["top_logprobs"] += out.top_logprobs
            if out.request_id == stream_id:
                sys.stdout.write(out.text)
                sys.stdout.flush()
            if out.finished:
                res["finish_reason"] = out.finish_reason
                if out.error is not None:  # this prompt failed alone; the others go on
                    res["error"] = out.error
                    print(f"error: prompt {out.request_id}: {out.error}", file=sys.stderr, flush=True)
    if orc.num_compiles_since_ready:
        print(f"warning: {orc.num_compiles_since_ready} compilations after warm-up", file=sys.stderr)
    for i, req in enumerate(requests):
        res = results[req.request_id]
        if FLAGS.format == "text":
            if req.request_id != stream_id:
                sys.stdout.write(f"\n--- prompt {i} ---\n{prompts[i]}{res['text']}")
            continue
        obj = dict(prompt=prompts[i], token_ids=res["token_ids"], text=res["text"], finish_reason=res["finish_reason"])
        if "error" in res:
            obj["error"] = res["error"]
        if FLAGS.logprobs is not None:
            obj["logprobs"] = res["logprobs"]
            if FLAGS.logprobs:
                obj["top_logprobs"] = [[{"id": t, "logprob": lp} for t, lp in step] for step in res["top_logprobs"]]
        print(json.dumps(obj, ensure_ascii=False))
    if FLAGS.format == "text":
        sys.stdout.write("\n")
    return 1 if any("error" in res for res in results.values()) else 0


if __name__ == "__main__":
    app.run(main, flags_parser=xflags.parse_flags)
