# issue 8: served always vs never at 128 closed-loop clients, overlapped steps, with the server's counters
NAME=a2; source .gpu_carry/calls/common.sh
timeout 280 $PY tools/serve_1p1d.py --modes never always --seconds 20 --warmup 5 --no-kill --out $W/default 2>&1 | tee "$W/serve_1p1d_default.txt"
