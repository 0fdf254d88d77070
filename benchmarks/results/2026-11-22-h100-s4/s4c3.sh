set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
uptime
for r in c d; do
  python3 benchmarks/hostmon.py --out $OUT/mon_$r.json > /tmp/mon_$r.txt & MON=$!
  timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 10 --runtime-dir /tmp/stgs-r$r --json $OUT/s1200$r.json > $OUT/s1200$r.log 2>&1; echo rc=$?
  kill $MON; wait $MON
  sed -n '/PHASE 1/,/^all/p;/requests sent/p;/sender lag/p;/stall/p' $OUT/s1200$r.log
  python3 -c "import json;d=json.load(open('$OUT/mon_$r.json'))['summary'];print({k:v for k,v in d.items() if k!='procs'})"
done
ls -la $OUT
