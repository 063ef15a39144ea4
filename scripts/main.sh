#!/usr/bin/env bash
# Sets up .venv (see setup.sh; COWENV_SKIP_SETUP=1 skips it when .venv is ready) and runs
# the main job: a fuzzing campaign against the COW PTE v4 patch as posted (every
# v4-origin flaw on, base 6.2, the default workload) in the small geometry (8 entries
# per table, 256 frames: in the x86-64 geometry one swap-out takes more preemption
# points than an episode has, so the swap-in flaw is out of reach), the greybox agent
# (coverage-guided, seeded from scenarios/), 100,000 env steps on 2 worker processes.
# Every new violation signature is written at once and minimised (at most 2 CPU seconds
# each, on both CPUs once the workers are done); then the cause search (60 CPU seconds at
# most) looks for the flaws no finding has shown yet in the schedules already met: each
# alone, masked by another flaw, or needed (leave-one-out) (README "Fuzzing campaigns"
# has the timing and what it shows).
# Extra arguments go to `cowenv fuzz` (e.g. --agent random, --budget 200000, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${COWENV_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi
OUT=${COWENV_FINDINGS:-findings/main-$(date +%Y%m%d-%H%M%S)}
.venv/bin/cowenv fuzz --preset as-posted --geometry small --agent greybox --budget 100000 \
    --workers 2 --minimise-seconds 2 --cause-seconds 60 --out "$OUT" "$@"
first=$(.venv/bin/python -c 'import json, sys
rows = json.load(open(sys.argv[1]))["findings"]
print(sys.argv[2] + "/" + rows[0]["file"] if rows else "")' "$OUT/index.json" "$OUT")
if [ -n "$first" ]; then
  echo
  echo "replaying the first finding:"
  .venv/bin/cowenv replay "$first"
  echo "per-thread timeline: .venv/bin/cowenv replay $first --trace"
fi
