"""The `adrenaline` command: `serve` (tritonserver), `generate` (in-process, no server),
`bench engine|offload|serve|plot`."""

from __future__ import annotations

import argparse
import json
import sys

from adrenaline_py.config import DEFAULT_EXECUTOR_SM_SHARE, DEFAULT_PREFILL_SM_SHARE, EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = p.add_argument_group("model and placement")
    g.add_argument("--model", default=d.model,
                   help="'smollm2' (shipped GGUF), an HF directory, a .gguf file, or dummy:<shape> "
                        "(llama-2-7b, llama-2-13b, llama-3.1-8b, tiny)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    g.add_argument("--prefill-gpu", type=int, default=d.prefill_gpu, help="GPU of prefill + attention executor")
    g.add_argument("--decode-gpu", type=int, default=d.decode_gpu, help="GPU of decode")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    g = p.add_argument_group("offloading")
    g.add_argument("--offload", default=d.offload,
                   help="never | always | auto | spill | ratio:R (0 <= R <= 1); spill: auto's rule applied only "
                   "to what decode's pool cannot hold")
    g.add_argument("--offload-bound", type=float, default=d.offload_bound,
                   help="auto: offloaded load / local load the executor can hide (OB); default: from the GPU's "
                        "profile (min(OB_mem, OB_comp)), else the executor / decode KV capacity ratio")
    g.add_argument("--two-batch-overlap", choices=["auto", "on", "off"], default=d.two_batch_overlap,
                   help="steps with every row offloaded run as two interleaved batches, so decode's dense work "
                        "overlaps the executor's attention; auto: when the step's KV reads outweigh the weights")
    g.add_argument("--two-batch-min-rows", type=int, default=d.two_batch_min_rows,
                   help="unless --two-batch-overlap off: steps with at least this many local and as many offloaded "
                        "rows run as two interleaved batches, the local rows and the offloaded ones, so the "
                        "executor's attention hides behind decode's whole layer of the local rows (0: never)")
    g.add_argument("--prefill-sm-share", type=int, default=d.prefill_sm_share,
                   help="MPS %% of SMs for prefill; default: with a profile, the smallest profiled share meeting "
                        f"--ttft-slo and --prompt-tokens-per-s, else {DEFAULT_PREFILL_SM_SHARE}")
    g.add_argument("--executor-sm-share", type=int, default=d.executor_sm_share,
                   help="MPS %% of SMs for the attention executor; default: 100 - the prefill share, "
                        f"else {DEFAULT_EXECUTOR_SM_SHARE}")
    g.add_argument("--ttft-slo", type=float, default=d.ttft_slo_ms,
                   help="time-to-first-token SLO in ms: with a profile, picks the prefill SM share")
    g.add_argument("--prompt-tokens-per-s", type=float, default=d.prompt_tokens_per_s,
                   help="prompt tokens per second the deployment is planned for (request rate x mean prompt "
                        "length; `bench serve` prints it as input_throughput): with a profile, prefill gets at "
                        "least the share at which the profile says it is busy at most 0.6 of the time beside the "
                        "executor (0.5 for profiles of prefill alone)")
    g.add_argument("--tpot-slo", type=float, default=d.tpot_slo_ms,
                   help="time-per-output-token SLO in ms: with a profile, the compute bound OB_comp of auto")
    g = p.add_argument_group("capacity")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len, help="prompt + output tokens")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="cuda: share of each GPU's total memory the server may use; sizes the KV pools")
    g.add_argument("--num-decode-blocks", type=int, default=None,
                   help="KV blocks of decode's pool; default: from GPU memory on cuda, 1024 on cpu")
    g.add_argument("--num-executor-blocks", type=int, default=None,
                   help="KV blocks of the executor's pool; default: from GPU memory on cuda, 1024 on cpu")
    g.add_argument("--max-decode-batch", type=int, default=d.max_decode_batch)
    g.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens)
    g.add_argument("--num-sender-threads", type=int, default=d.num_sender_threads)
    g.add_argument("--gil-switch-interval-ms", type=float, default=d.gil_switch_interval_ms,
                   help="the decode process's Python switch interval (CPython default 5)")
    g.add_argument("--admission-timeout", type=float, default=d.admission_timeout_s,
                   help="seconds a request may wait for KV room before it is rejected")
    g.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests that may wait for KV room at once; beyond it new ones are rejected at once")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of dummy weights")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run every decode step eagerly (cuda only)")
    g.add_argument("--overlap-steps", action=argparse.BooleanOptionalAction, default=d.overlap_steps,
                   help="launch each decode step before the previous one's tokens reach the host, so the host's "
                        "per-step work runs while the GPU works (--no-overlap-steps: one step at a time)")
    g.add_argument("--offload-timeout", type=float, default=d.offload_timeout_s,
                   help="seconds an offloaded step may stall before the executor is killed and replaced")
    g.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s,
                   help="seconds a worker or stub may go without a heartbeat (stopped, wedged) before it is "
                        "killed and restarted")


def engine_config_from_args(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=a.model, device=a.device, prefill_gpu=a.prefill_gpu, decode_gpu=a.decode_gpu,
        dtype=a.dtype or ("float32" if a.device == "cpu" else "bfloat16"),
        offload=a.offload, offload_bound=a.offload_bound, two_batch_overlap=a.two_batch_overlap,
        two_batch_min_rows=a.two_batch_min_rows,
        prefill_sm_share=a.prefill_sm_share,
        executor_sm_share=a.executor_sm_share, ttft_slo_ms=a.ttft_slo, tpot_slo_ms=a.tpot_slo,
        prompt_tokens_per_s=a.prompt_tokens_per_s,
        gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.max_model_len,
        max_tokens_limit=a.max_tokens_limit, default_max_tokens=a.default_max_tokens,
        block_size=a.block_size, num_decode_blocks=a.num_decode_blocks,
        num_executor_blocks=a.num_executor_blocks, max_decode_batch=a.max_decode_batch,
        max_prefill_tokens=a.max_prefill_tokens, num_sender_threads=a.num_sender_threads,
        gil_switch_interval_ms=a.gil_switch_interval_ms,
        admission_timeout_s=a.admission_timeout, max_queued_requests=a.max_queued_requests, seed=a.seed,
        cuda_graphs=not a.no_cuda_graphs, offload_timeout_s=a.offload_timeout, overlap_steps=a.overlap_steps,
        heartbeat_timeout_s=a.heartbeat_timeout,
    )


def cmd_serve(a: argparse.Namespace) -> int:
    import os

    from adrenaline_py.serving.launcher import API_KEY_ENV, ServerOptions, serve_forever

    apis = tuple(x.strip() for x in a.restricted_apis.split(",") if x.strip())
    if apis in ((), ("none",)):
        apis = ()
    if a.drain_timeout < 0 or a.stop_grace < 0:
        raise ValueError("--drain-timeout and --stop-grace must be >= 0")
    options = ServerOptions(
        address=a.address, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
        max_batch_size=a.max_batch_size, log_verbose=a.log_verbose, use_mps=not a.no_mps,
        vllm_model_name=a.vllm_model_name,
        restricted_apis=apis, api_key=a.api_key or os.environ.get(API_KEY_ENV) or None,
        api_key_header=a.api_key_header, drain_timeout_s=a.drain_timeout, stop_grace_s=a.stop_grace,
        front=not a.no_front, http_max_body_bytes=a.http_max_body_bytes, http_max_json_depth=a.http_max_json_depth,
        grpc_max_message_bytes=a.grpc_max_message_bytes,
        served_model_name=a.served_model_name, max_restarts=a.max_restarts,
    )
    return serve_forever(engine_config_from_args(a), options)


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from adrenaline_py.engine.local import LocalEngine
    from adrenaline_py.loader import load_checkpoint
    from adrenaline_py.request import InvalidRequest, Limits, check_ranges, finish_params

    engine = engine_config_from_args(a)
    ckpt = load_checkpoint(engine.model)
    tok = ckpt.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) if a.chat else p for p in a.prompt]
    ids = [tok.encode(p) for p in prompts]
    limits = Limits(engine.max_model_len, engine.max_tokens_limit, engine.default_max_tokens)
    settings = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}
    if a.seed_sampling is not None:
        settings["seed"] = a.seed_sampling
    try:
        check_ranges(settings, limits)
    except InvalidRequest as e:
        raise ValueError(str(e)) from None
    params = [finish_params(settings, len(i), limits, ckpt.config.vocab_size, tok.eos_token_ids,
                            lambda w: tok.encode(w, add_special_tokens=False)) for i in ids]
    with LocalEngine(ckpt, engine, getattr(torch, engine.dtype)) as llm:
        for prompt, c in zip(a.prompt, llm.generate(ids, params)):
            print(json.dumps({"prompt": prompt, "text_output": c.text, "finish_reason": c.finish_reason,
                              "num_output_tokens": len(c.output_ids), "offloaded": c.offloaded}))
    return 0


def cmd_tokenizer(a: argparse.Namespace) -> int:
    from adrenaline_py.loader import load_checkpoint

    out = load_checkpoint(a.model, with_weights=False).tokenizer.save_pretrained(a.out)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adrenaline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the model repository with tritonserver",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--address", default="127.0.0.1", help="bind address of HTTP, gRPC and metrics")
    g.add_argument("--http-port", type=int, default=8000)
    g.add_argument("--grpc-port", type=int, default=8001)
    g.add_argument("--metrics-port", type=int, default=8002)
    g.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size of the models")
    g.add_argument("--vllm-model-name", default="vllm_model",
                   help="name of the vLLM-backend-style entry model ('' leaves it out)")
    g.add_argument("--log-verbose", type=int, default=0)
    g.add_argument("--no-mps", action="store_true", help="do not start the CUDA MPS daemon (cuda only)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish (tritonserver "
                        "--exit-timeout-secs, rounded up)")
    g.add_argument("--stop-grace", type=float, default=30.0,
                   help="seconds tritonserver gets after the drain timeout before it and its stubs are killed")
    g.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of a tritonserver (and of an HTTP front) that died, per 10 minutes, before "
                        "the launcher gives up")
    g = s.add_argument_group("front (guards for tritonserver 2.51's HTTP and gRPC, OpenAI API)")
    g.add_argument("--no-front", action="store_true",
                   help="expose tritonserver's HTTP and gRPC directly on --http-port and --grpc-port, without the "
                        "front: UNSAFE with 2.51, where a body of 4 MB or JSON nested 100,000 deep crashes the "
                        "server and gRPC takes messages of up to 2 GB; no OpenAI API")
    g.add_argument("--http-max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413 from the front (after decompression)")
    g.add_argument("--http-max-json-depth", type=int, default=32,
                   help="request bodies with JSON nested deeper get 400 from the front")
    g.add_argument("--grpc-max-message-bytes", type=int, default=4 << 20,
                   help="larger gRPC messages end their call with RESOURCE_EXHAUSTED at the front")
    g.add_argument("--served-model-name", default=None,
                   help="the model name of the OpenAI API (/v1/models); default: the --model value")
    g = s.add_argument_group("security")
    g.add_argument("--restricted-apis", default="model-repository,shared-memory,logging,trace",
                   help="comma-separated tritonserver API groups that need the API key header (health, "
                        "metadata, inference, shared-memory, model-config, model-repository, statistics, "
                        "trace, logging), or 'none'")
    g.add_argument("--api-key", default=None,
                   help="value of the API key header (at least 16 characters); default: $ADRENALINE_API_KEY, "
                        "else a random key, printed at start-up and written to <run dir>/api_key")
    g.add_argument("--api-key-header", default="x-adrenaline-api-key",
                   help="HTTP header of the API key; over gRPC the metadata key is "
                        "triton-grpc-protocol-<header>")
    s.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate in-process (no server), one JSON line per prompt",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_args(gen)
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=EngineConfig().default_max_tokens)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed-sampling", type=int, default=None, help="sampling seed")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    be = bench.add_parser("engine", help="decode attention and decode step next to the bandwidth roofline (GPU)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from adrenaline_py import bench as bench_mod

    bench_mod.add_arguments(be)
    be.set_defaults(func=bench_mod.main)
    bo = bench.add_parser("offload", help="offloaded decode steps on two GPUs next to the all-local step (GPU)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from adrenaline_py import bench_offload

    bench_offload.add_arguments(bo)
    bo.set_defaults(func=bench_offload.main)
    bs = bench.add_parser("serve", help="load a running server: throughput, TTFT/TPOT/ITL, SLO attainment, "
                          "server metrics (docs/bench_serve.md)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from adrenaline_py.serving import bench_serve

    bench_serve.add_arguments(bs)
    bs.set_defaults(func=bench_serve.main)
    bp = bench.add_parser("plot", help="plot `bench serve` results against request rate, one line per label",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_serve.add_plot_arguments(bp)
    bp.set_defaults(func=bench_serve.plot_main)

    pr = sub.add_parser("profile", help="offline profile of a GPU and model shape: attention bandwidth and prefill "
                                        "latency against the MPS SM share, decode step against the batch (GPU)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from adrenaline_py import bench_profile

    bench_profile.add_arguments(pr)
    pr.set_defaults(func=bench_profile.main)

    tk = sub.add_parser("tokenizer", help="write the model's tokenizer as a Hugging Face tokenizer directory "
                                          "(for genai-perf --tokenizer and other HF tools)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tk.add_argument("--model", default=EngineConfig().model, help="as for serve")
    tk.add_argument("--out", required=True, help="directory to write")
    tk.set_defaults(func=cmd_tokenizer)

    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"adrenaline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
