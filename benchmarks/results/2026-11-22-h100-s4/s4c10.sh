set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/hostmon.py --out $OUT/mon_n.json > /dev/null & MON=$!
timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 10 --runtime-dir /tmp/stgs-rn --json $OUT/s1200n.json > $OUT/s1200n.log 2>&1; echo rc=$?
kill $MON; wait $MON
sed -n '/PHASE 1/,/^all/p;/SWITCH/,/^all/p;/requests sent/p;/sender lag/p;/phase1:/p' $OUT/s1200n.log
ls -la $OUT
