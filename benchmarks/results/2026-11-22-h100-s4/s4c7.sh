set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 benchmarks/hostmon.py --out $OUT/mon_h.json > /dev/null & MON=$!
timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 5 --stall-dump $OUT/stalls_f.txt --runtime-dir /tmp/stgs-rf --json $OUT/s1200f.json > $OUT/s1200f.log 2>&1; echo rc=$?
sed -n '/PHASE 1/,/^all/p;/sender lag/p;/phase1:/p' $OUT/s1200f.log
grep -c "stall at" $OUT/stalls_f.txt
timeout -k 10 200 /tmp/site/bin/py-spy record --gil --nonblocking -r 200 -f raw -o $OUT/spy_g.txt -- python3 benchmarks/serve_gpu.py --after-s 5 --stall-dump $OUT/stalls_g.txt --runtime-dir /tmp/stgs-rg --json $OUT/s1200g.json > $OUT/s1200g.log 2>&1; echo rc=$?
kill $MON; wait $MON
sed -n '/PHASE 1/,/^all/p;/sender lag/p;/phase1:/p' $OUT/s1200g.log
grep -c "stall at" $OUT/stalls_g.txt
tail -5 $OUT/s1200g.log
rm -f $OUT/*.npz
ls -la $OUT
