#!/usr/bin/env bash
# The GPU check on an offline machine (see benchmarks/GPU_CHECK.md): installs the carried wheels (.whl/) and this
# repository into /tmp/site without touching the machine's own packages, then runs benchmarks/gpu_check.py.
# Arguments go to gpu_check.py (e.g. --only image_tokens,training_flex for a rerun). Results: $OUT/gpu_check.{json,log}.
set -u
cd "$(dirname "$0")/.."
site=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# the package maps lavit.modeling etc. onto top-level folders (setuptools package-dir), so it must be installed;
# where the machine's setuptools cannot build it, the same layout is copied by hand
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" .; then
  echo "pip could not install the repository; copying the package layout instead"
  mkdir -p "$site/lavit" && cp -r lavit/. "$site/lavit/"
  for pair in modeling_lavit:modeling processing:processing training:training hub_cards:hub_cards; do
    rm -rf "${site:?}/lavit/${pair#*:}" && cp -r "${pair%%:*}" "$site/lavit/${pair#*:}"
  done
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 470 python3 -P benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}" "$@"
