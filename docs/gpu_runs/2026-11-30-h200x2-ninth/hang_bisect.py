"""(Ninth run, docs/performance.md (c); run from the repository root.)
Bisect the one-GPU in-process `always` hang (docs/performance.md, "Not done"): LocalEngine on one GPU
with every row offloaded, in variants (CUDA graphs on/off, overlapped steps on/off, executor graphs), each in
its own subprocess with a timeout. Prints which variants finish. Usage: python3 hang_bisect.py [timeout_s]."""
import os
import subprocess
import sys
import textwrap

TIMEOUT = float(sys.argv[1]) if len(sys.argv) > 1 else 40
CHILD = textwrap.dedent("""
    import dataclasses, faulthandler, sys, torch
    faulthandler.dump_traceback_later(float(sys.argv[4]), exit=True)
    sys.path.insert(0, "tests")
    from conftest import greedy, small_engine_config
    from adrenaline_py.config import NAMED_SHAPES
    from adrenaline_py.engine.local import LocalEngine
    from adrenaline_py.loader import Checkpoint
    from adrenaline_py.weights.dummy import byte_tokenizer
    import transformers
    graphs, overlap, offload = sys.argv[1] == "1", sys.argv[2] == "1", sys.argv[3]
    cfg = dataclasses.replace(NAMED_SHAPES["tiny"], head_dim=64, hidden_size=256, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=512, num_hidden_layers=3)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
    ckpt = Checkpoint("tiny", cfg, byte_tokenizer(cfg), {k: v.detach().clone() for k, v in hf.state_dict().items()})
    ec = small_engine_config(device="cuda", offload=offload, run_dir="/tmp/hang-bisect", prefill_gpu=0, decode_gpu=0,
                             two_batch_overlap="off", overlap_steps=overlap, cuda_graphs=graphs)
    with LocalEngine(ckpt, ec, dtype=torch.float32) as engine:
        got = engine.generate([[5, 6, 7], list(range(3, 43))], [greedy(6), greedy(6)])
    print("finished", [c.output_ids for c in got], flush=True)
""")
VARIANTS = [("1", "0", "always"), ("0", "0", "always"), ("0", "1", "always"), ("1", "1", "always"),
            ("1", "0", "ratio:0.5")]
if os.environ.get("BISECT_VARIANTS"):
    VARIANTS = [tuple(v.split("/")) for v in os.environ["BISECT_VARIANTS"].split()]
print("CUDA_MODULE_LOADING", os.environ.get("CUDA_MODULE_LOADING"), flush=True)
for graphs, overlap, offload in VARIANTS:
    os.makedirs("/tmp/hang-bisect", exist_ok=True)
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, graphs, overlap, offload, str(TIMEOUT - 6)],
                           capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
        print(f"graphs={graphs} overlap={overlap} {offload}: rc {r.returncode} {r.stdout.strip()[-200:]} "
              f"{r.stderr.strip()[-int(os.environ.get('BISECT_TAIL', 6000)):] if r.returncode else ''}", flush=True)
    except subprocess.TimeoutExpired:
        print(f"graphs={graphs} overlap={overlap} {offload}: HANG (> {TIMEOUT:.0f} s)", flush=True)
