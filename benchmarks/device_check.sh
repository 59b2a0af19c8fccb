#!/usr/bin/env bash
# The device check in one call. Here, once, from the repository root:
#   bash benchmarks/device_check.sh --download      (the wheels the device lacks, into .whl/)
# then one `run` with carry [".whl"] and the command:
#   bash benchmarks/device_check.sh
set -euo pipefail
WHEELS=(
  annotated-types==0.8.0 bokeh==3.9.2 dask-cuda==26.10.0 dask==2026.7.1 distributed==2026.7.1
  donfig==0.8.1.post1 google-crc32c==1.9.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
  locket==1.0.0 numcodecs==0.16.6 partd==1.4.2 pydantic==2.14.4 pydantic_core==2.50.5
  pytz==2026.6 rapids-dask-dependency==26.10.0 tblib==3.2.2 tornado==6.6.1
  typing-inspection==0.4.5 tzdata==2026.6 xyzservices==2026.9.1 zarr==3.1.6 zict==3.0.0
  zlib-ng==1.1.0
)
if [[ "${1:-}" == "--download" ]]; then
  grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "${WHEELS[@]}"
  exit
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python3 benchmarks/device_check.py --out "${OUT:-/tmp}/device_check.json"
