#!/usr/bin/env bash
# Drop-in for MindFormers' transform_checkpoint.sh:
#   bash tools/transform_checkpoint.sh SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE PROCESS_NUM [PREFIX]
# Starts PROCESS_NUM converters (converter i writes destination ranks [i*W/P, (i+1)*W/P)), waits for all and
# exits non-zero if any failed. Unlike the original it deletes nothing (no `rm -rf ./log`): logs go to
# ${JAXRESHARD_LOG_DIR:-./log}/transform_<i>.log.
set -u
if [ $# -lt 6 ]; then
  echo "usage: $0 SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE PROCESS_NUM [PREFIX]" >&2
  exit 2
fi
src=$1; src_strategy=$2; dst=$3; dst_strategy=$4; world=$5; procs=$6; prefix=${7:-checkpoint_}
if [ "$procs" -lt 1 ] || [ $((world % procs)) -ne 0 ]; then
  echo "transform_checkpoint.sh: PROCESS_NUM $procs must divide WORLD_SIZE $world" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
logs=${JAXRESHARD_LOG_DIR:-./log}
mkdir -p "$logs"
pids=()
for ((i = 0; i < procs; i++)); do
  python "$here/transform_checkpoint.py" --src_checkpoint "$src" --src_strategy "$src_strategy" \
    --dst_checkpoint_dir "$dst" --dst_strategy "$dst_strategy" --prefix "$prefix" \
    --rank_id $((i * world / procs)) --world_size "$world" --transform_process_num "$procs" \
    > "$logs/transform_$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "transform_checkpoint.sh: converter $i failed; see $logs/transform_$i.log" >&2
    tail -n 3 "$logs/transform_$i.log" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] && echo "transform finished: $dst"
exit "$failed"
