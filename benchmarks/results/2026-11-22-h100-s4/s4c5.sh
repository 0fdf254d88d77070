set -u
pip install --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
MIX=resnet50:15:600,vit_b_16:40:60,bert_base:40:60,mobilenet_v3_large:30:60,efficientnet_b0:30:60,densenet121:40:60
python3 benchmarks/hostmon.py --out $OUT/mon_f.json > /dev/null & MON=$!
timeout -k 5 335 python3 benchmarks/baselines_gpu.py --models $MIX \
  --systems stgs,mps --stgs-start 1.5 --stgs-plan peak --stgs-over-peak --start 1.0 --max-trials 6 --trial-s 10 \
  --warmup-s 2 --drain-s 1 --time-budget-s 320 --runtime-dir /tmp/stgs-bl5 \
  --json $OUT/baselines_e2.json > $OUT/baselines_e2.log 2>&1; echo rc=$?
grep -E "^\s+\[|->" $OUT/baselines_e2.log | cut -c1-230
timeout -k 5 225 python3 benchmarks/baselines_gpu.py \
  --systems stgs --stgs-start 2.932 --stgs-plan peak --stgs-over-peak --max-trials 6 --trial-s 10 \
  --warmup-s 2 --drain-s 1 --time-budget-s 210 --runtime-dir /tmp/stgs-bl6 \
  --json $OUT/baselines_a2.json > $OUT/baselines_a2.log 2>&1; echo rc=$?
kill $MON; wait $MON
grep -E "^\s+\[|->" $OUT/baselines_a2.log | cut -c1-230
grep -E "^\|" $OUT/baselines_e2.log | tail -6
ls -la $OUT
