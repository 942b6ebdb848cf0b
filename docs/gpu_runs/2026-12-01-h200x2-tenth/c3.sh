# issue 8: served always vs never at 128 closed-loop clients (default shares, then prefill 20 / executor 80)
NAME=c3; source .gpu_carry/calls/common.sh
timeout 250 $PY tools/serve_1p1d.py --modes never always --seconds 20 --warmup 5 --no-kill --out $W/default 2>&1 | tee "$W/serve_1p1d_default.txt"
timeout 200 $PY tools/serve_1p1d.py --modes always --seconds 20 --warmup 5 --no-kill --prefill-sm-share 20 --executor-sm-share 80 --out $W/p20 2>&1 | tee "$W/serve_1p1d_p20.txt"
