#!/usr/bin/env bash
# Regenerates the goodput figures behind docs/results.md, "On equal terms": every setting, under both shared
# admission modes, three seeds, every policy at its best tuning and split; the colocated baselines and DistServe
# again behind INFaaS placement. Then prints the tables (scripts/results_tables.py).
# Seed k: the k-th Poisson draw of a length table's arrivals; for a timed trace, which keeps its own arrivals,
# its requests from k × 1200 s into the trace (three disjoint windows of the hour).
# Usage: scripts/results.sh   (JOBS=2 runs two searches at a time; POLICIES, SEEDS, SETTINGS, MODES narrow it;
#                              SUFFIX names the files of a partial run so a later one can add to it)
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh)
bin=$(dirname "$py")
out=${OUT:-docs/figures/equal-terms}
mkdir -p "$out"
policies=${POLICIES:-vllm,sarathi,distserve,tropical,kairos,unified}
infaas=${INFAAS_POLICIES-vllm,sarathi,distserve}
suffix=${SUFFIX:-}
window() {  # the replay of seed $2 on setting $1
  case "$1" in
    chat-13b) echo "--seed $2 --start-s $(($2 * 1200)) --requests 2000" ;;  # the setting's own request counts
    long-66b) echo "--seed $2 --start-s $(($2 * 1200)) --requests 1000" ;;
    *) echo "--seed $2" ;;
  esac
}
{
  for setting in ${SETTINGS:-chat-13b longbench-70b long-66b}; do
    for mode in ${MODES:-none hopeless}; do
      for seed in ${SEEDS:-0 1 2}; do
        echo "goodput --setting $setting --admission $mode $(window "$setting" "$seed") --policies $policies --json $out/$setting-$mode-seed$seed$suffix.json"
        if [ -n "$infaas" ]; then
          echo "goodput --setting $setting --admission $mode $(window "$setting" "$seed") --policies $infaas --option router.rule=infaas --json $out/$setting-$mode-seed$seed-infaas.json"
        fi
      done
    done
  done
} | xargs -P "${JOBS:-2}" -L 1 "$bin/tropical" > "$out/log$suffix.txt"
"$py" scripts/results_tables.py "$out"
