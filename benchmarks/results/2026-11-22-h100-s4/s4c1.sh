set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,mig.mode.current --format=csv,noheader; nproc; cat /proc/self/cgroup; cat /sys/fs/cgroup/cpu.max 2>/dev/null; cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null; uptime; lscpu | grep -E 'Model name|Hypervisor|^CPU\(s\)|Thread'; } > $OUT/host.txt 2>&1
cat $OUT/host.txt
for r in a b; do
  python3 benchmarks/hostmon.py --out $OUT/mon_$r.json > /tmp/mon_$r.txt & MON=$!
  timeout -k 10 190 python3 benchmarks/serve_gpu.py --after-s 10 --runtime-dir /tmp/stgs-r$r --json $OUT/s1200$r.json > $OUT/s1200$r.log 2>&1; echo rc=$?
  kill $MON; wait $MON
  sed -n '/PHASE 1/,/^all/p;/requests sent/p;/sender lag/p;/stall/p' $OUT/s1200$r.log
  python3 -c "import json;d=json.load(open('$OUT/mon_$r.json'))['summary'];print({k:v for k,v in d.items() if k!='procs'});[print(v,k[:90]) for k,v in d['procs'].items()]"
done
ls -la $OUT
