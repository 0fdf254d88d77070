set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
MIX=resnet50:15:600,vit_b_16:40:60,bert_base:40:60,mobilenet_v3_large:30:60,efficientnet_b0:30:60,densenet121:40:60
python3 benchmarks/hostmon.py --out $OUT/mon_g.json > /dev/null & MON=$!
timeout -k 5 565 python3 benchmarks/baselines_gpu.py --models $MIX \
  --systems stgs,timeslice,mps,streams --stgs-start 2.75 --stgs-plan peak --stgs-over-peak --start 1.4 --max-trials 5 --trial-s 10 \
  --warmup-s 2 --drain-s 1 --time-budget-s 550 --runtime-dir /tmp/stgs-bl7 \
  --json $OUT/baselines_e3.json > $OUT/baselines_e3.log 2>&1; echo rc=$?
kill $MON; wait $MON
grep -E "^\s+\[|->" $OUT/baselines_e3.log | cut -c1-230
grep -E "^\|" $OUT/baselines_e3.log | tail -7
ls -la $OUT
