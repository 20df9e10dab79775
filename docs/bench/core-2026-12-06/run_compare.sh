# Before (f91c6a6, /work/before_pkg) and after (/work/main), back to back on this machine.
A=/work/shared/data/aegaeon/workloads
OUT=/work/benchout
TP=/work/main/.venv/bin/tokenpool
dir_before=/work/before_pkg/tokenpool; pp_before=/work/before_pkg
dir_after=/work/main; pp_after=
for tag in before after; do
  eval "d=\$dir_$tag; p=\$pp_$tag"
  (cd $d && PYTHONPATH=$p /usr/bin/time -f "$tag scale-sim %e s wall %U s user" $TP simulate --config configs/sim/aegaeon-h800.yaml --workload /tmp/scale/synth-1000-0.1-1.0-1.0.csv --num-devices 200 --json $OUT/$tag-scale.json)
done
cmp $OUT/before-scale.json $OUT/after-scale.json && echo SCALE-IDENTICAL
for tag in before after; do
  eval "d=\$dir_$tag; p=\$pp_$tag"
  (cd $d && PYTHONPATH=$p timeout 900 $TP bench sweep --config configs/bench/cpu-8models.yaml --schedulers token-level,request-level --rates 10,12 --report $OUT/$tag-sweep2.md --json $OUT/$tag-sweep2.json)
done
for tag in before after; do
  eval "d=\$dir_$tag; p=\$pp_$tag"
  (cd $d && PYTHONPATH=$p timeout 300 $TP bench proxy --config configs/fleet.yaml --json $OUT/$tag-proxy2.json)
done
echo ALLDONE
