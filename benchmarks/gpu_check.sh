#!/usr/bin/env bash
# The CUDA paths on a lent GPU machine, in under 4 minutes: the `gpu` tests, then bf16 training
# with FSDP1 and FSDP2 and checkpoints, in one table (benchmarks/gpu_check.py).
#
# The machine's python3 already holds torch (2.11, CUDA), transformers and accelerate, and nothing
# can be downloaded there. This script never installs torch: it installs fsdp_nb with --no-deps,
# plus the wheels in .whl/ for what the image lacks (ipython, ipywidgets, ruamel.yaml, ...).
# Fetch those here first, once:   bash benchmarks/gpu_wheels.sh
# Then run, with .whl carried:     bash benchmarks/gpu_check.sh
# `GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh` runs the same steps on the CPU, to check the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SITE=${GPU_CHECK_SITE:-/tmp/fsdp_nb_site}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
# fsdp_nb itself, no dependencies: a build needs setuptools>=77, which an image may lack; the
# source tree on PYTHONPATH is the same code, so that is the fallback.
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . 2>/dev/null; then
    echo "fsdp_nb: pip could not build the package here; using the source tree on PYTHONPATH"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import fsdp_nb, IPython, ruamel.yaml; print('fsdp_nb', fsdp_nb.__version__, 'from', fsdp_nb.__file__)"

start=$(date +%s)
if [ "$DEVICE" = cuda ]; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
fi
"$PY" benchmarks/gpu_check.py --device "$DEVICE" ${GPU_CHECK_ARGS:-}
echo "gpu_check: $(( $(date +%s) - start )) s"
