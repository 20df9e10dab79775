OUT=/work/benchout
TP=/work/main/.venv/bin/tokenpool
dir_before=/work/before_pkg/tokenpool; pp_before=/work/before_pkg
dir_after=/work/main; pp_after=
for tag in after before; do
  eval "d=\$dir_$tag; p=\$pp_$tag"
  (cd $d && PYTHONPATH=$p timeout 900 $TP bench sweep --config configs/bench/cpu-8models.yaml --schedulers token-level,request-level --rates 10,12 --no-simulate --report $OUT/$tag-sweep4.md --json $OUT/$tag-sweep4.json)
done
echo ALLDONE
