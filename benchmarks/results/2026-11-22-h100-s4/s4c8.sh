set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
cat /proc/pressure/cpu /proc/pressure/memory 2>&1; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.high 2>&1 | head -3
python3 benchmarks/hostmon.py --interval-s 0.25 --out $OUT/mon_i.json > /dev/null & MON=$!
timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 5 --stall-dump $OUT/stalls_i.txt --runtime-dir /tmp/stgs-ri --json $OUT/s1200i.json > $OUT/s1200i.log 2>&1; echo rc=$?
kill $MON; wait $MON
sed -n '/PHASE 1/,/^all/p;/sender lag/p;/phase1:/p' $OUT/s1200i.log
python3 benchmarks/hostmon.py --interval-s 0.25 --out $OUT/mon_j.json > /dev/null & MON=$!
timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 5 --models resnet50:15:600,mobilenet_v3_large:10:600,vit_b_16:20:300,bert_base:25:300,efficientnet_b0:10:600 --stall-dump $OUT/stalls_j.txt --runtime-dir /tmp/stgs-rj --json $OUT/s2400j.json > $OUT/s2400j.log 2>&1; echo rc=$?
kill $MON; wait $MON
sed -n '/PHASE 1/,/^all/p;/sender lag/p;/phase1:/p' $OUT/s2400j.log
for r in i j; do python3 -c "
import json;d=json.load(open('$OUT/mon_$r.json'))['summary'];print({k:v for k,v in d.items() if k not in ('procs',)})
[print(v,k[:70]) for k,v in list(d['procs'].items())[:6]]"; done
rm -f $OUT/*.npz
ls -la $OUT
