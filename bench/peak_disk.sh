#!/bin/bash
# Peak disk of a command: `du` of DIR (hard links counted once) sampled every 0.5 s while it runs.
#
#   bash bench/peak_disk.sh DIR COMMAND...
#   bash bench/peak_disk.sh . dvc repro prepare      # in a clone whose params.yaml points at the data
#
# Prints the command's exit status, its wall time, DIR's size before, at the peak and after, and
# the peak rise of the file system's used bytes (`df`, which other processes move too).
set -u
dir=$1; shift
size() { du -s -B1 "$dir" 2>/dev/null | cut -f1; }
used() { df -B1 --output=used "$dir" | tail -1; }
before=$(size); peak=$before; used0=$(used); used_peak=$used0
start=$(date +%s.%N)
"$@" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  s=$(size); u=$(used)
  [ "${s:-0}" -gt "$peak" ] && peak=$s
  [ "$u" -gt "$used_peak" ] && used_peak=$u
  sleep 0.5
done
wait "$pid"; rc=$?
end=$(date +%s.%N)
after=$(size)
python3 -c "
g = 2 ** 30
print(f'rc {$rc}  wall {$end - $start:.1f} s  {\"$dir\"}: before {$before / g:.2f} GiB, peak {$peak / g:.2f} GiB, '
      f'after {$after / g:.2f} GiB  (df: used rose {($used_peak - $used0) / g:.2f} GiB at the peak)')"
exit $rc
