#!/bin/bash
# Session 6 (2026-12-04): fidelity of the five repeats of serve_gpu.py's 1200 req/s run (one
# plan, one schedule), calibrated by partition vs bucket, noise profile vs runtime, and their
# repeatability. From the repository root:
#   bash benchmarks/results/2026-12-04-s6/measure.sh [WORKDIR (default /tmp/s6)]
# The .npz of the runs come from git history into WORKDIR (never into the tree); the --json
# outputs and the tables go to benchmarks/results/2026-12-04-s6/out/.
set -euo pipefail
W=${1:-/tmp/s6}; S=$W/runs; O=benchmarks/results/2026-12-04-s6/out; N=$W/noise
P=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
mkdir -p $S $O $N
R4=benchmarks/results/2026-11-22-h100-s4; R3=benchmarks/results/2026-11-22-h100-s3
for r in a c d; do git show e098f1f:$R4/s1200$r.npz > $S/s1200$r.npz; cp $R4/s1200$r.json $S/; done
git show b47ab2e:$R4/s1200n.npz > $S/s1200n.npz; cp $R4/s1200n.json $S/
git show 3123904:$R3/r1200.npz > $S/r1200.npz; cp $R3/r1200.json $S/
ALL="s1200a s1200c s1200d s1200n r1200"
others() { for y in $ALL; do [ "$y" != "$1" ] && echo -n "$S/$y.json "; done; }
# runtime noise: of each run alone, and of every run's other four
for x in $ALL; do
  $P -m benchmarks.fidelity --fit-noise $N/noise_$x.json $S/$x.json > $O/noise_$x.txt
  $P -m benchmarks.fidelity --fit-noise $N/noise_not_$x.json $(others $x) > $O/noise_not_$x.txt
done
one() { # tag run [calibration runs...]; $BY, $NOISE, $NF
  local tag=$1 x=$2; shift 2
  local nz=""; [ "$NOISE" = runtime ] && nz="--noise runtime --runtime-noise $NF"
  local cal=""; [ $# -gt 0 ] && cal="--calibrate-from $* --calibrate-by $BY"
  echo "python -m benchmarks.fidelity $S/$x.json --seeds 10 $cal $nz" >> $O/commands.txt
  $P -m benchmarks.fidelity $S/$x.json --seeds 10 $cal $nz --json $O/$tag.json > /dev/null
}
: > $O/commands.txt
for x in $ALL; do
  NOISE=profile one "$x.none.-.profile" $x
  for BY in partition bucket; do
    NOISE=profile one "$x.others.$BY.profile" $x $(others $x)
    NOISE=runtime NF=$N/noise_not_$x.json one "$x.others.$BY.runtime" $x $(others $x)
  done
done
for pair in "s1200c s1200d" "s1200d s1200c"; do
  set -- $pair
  for BY in partition bucket; do
    NOISE=profile one "$1.$2.$BY.profile" $1 $S/$2.json
    NOISE=runtime NF=$N/noise_$2.json one "$1.$2.$BY.runtime" $1 $S/$2.json
  done
done
for m in queued scheduled; do
  $P -m benchmarks.repeatability $S/s1200c.json $S/s1200d.json --arrivals $m > $O/repeat_cd_$m.txt
  $P -m benchmarks.repeatability $S/s1200c.json $S/s1200d.json $S/s1200n.json --arrivals $m \
    > $O/repeat_cdn_$m.txt
  $P -m benchmarks.repeatability $(for y in $ALL; do echo -n "$S/$y.json "; done) --arrivals $m \
    > $O/repeat_all_$m.txt
done
$P benchmarks/results/2026-12-04-s6/table.py $O > $O/table.md
