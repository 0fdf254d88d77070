set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
ls /tmp/site/bin | head
timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 5 --runtime-dir /tmp/stgs-rc --json $OUT/spy.json > $OUT/spy.log 2>&1 & P=$!
sleep 45
SP=$(pgrep -f "serve_gpu.py --after-s 5" | head -1); echo main pid $SP
/tmp/site/bin/py-spy record --gil --nonblocking -r 250 -d 25 -p $SP -f raw -o $OUT/spy_gil.txt > /tmp/spy1.txt 2>&1 & S1=$!
/tmp/site/bin/py-spy record --nonblocking -r 250 -d 25 -p $SP -f raw -o $OUT/spy_all.txt > /tmp/spy2.txt 2>&1 & S2=$!
wait $S1 $S2; tail -3 /tmp/spy1.txt /tmp/spy2.txt
wait $P; echo rc=$?
rm -f $OUT/spy.npz
sed -n '/PHASE 1/,/^all/p;/requests sent/p;/sender lag/p;/stall/p' $OUT/spy.log
ls -la $OUT
