set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
run() { # name, then extra args / prefix
  n=$1; shift
  timeout -k 10 170 "$@" --after-s 5 --runtime-dir /tmp/stgs-$n --json $OUT/s1200$n.json > $OUT/s1200$n.log 2>&1; echo "$n rc=$?"
  sed -n '/^all/p;/sender lag/p;/phase1:/p' $OUT/s1200$n.log | head -3
}
run k python3 benchmarks/serve_gpu.py
run l python3 benchmarks/serve_gpu.py --senders 0 --switch-interval-us 1000
run m taskset -c 0-7 python3 benchmarks/serve_gpu.py
rm -f $OUT/*.npz
ls -la $OUT
