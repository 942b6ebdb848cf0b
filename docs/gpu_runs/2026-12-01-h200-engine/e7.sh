# prefill alone and beside an attention load (sized from the shape), llama-3.1-8b, shares 10-80 %
NAME=e7; source .gpu_carry/calls/common.sh
timeout 560 $PY -m adrenaline_py.cli profile --shapes llama-3.1-8b --shares 10 20 30 40 60 80 \
  --prompt-lens 128 512 1024 2048 --prefill-only --out $W/profiles 2>&1 | grep -v Warning | tail -n 40 | tee "$W/profile.txt"
ls $W/profiles $W/profiles/runs
