#!/usr/bin/env bash
# Python 3.12 x86-64 wheels of what the pipeline needs beyond a CUDA + PyTorch image (numpy,
# scipy, pandas, pyarrow, matplotlib, pyyaml, requests, aiohttp, numba, scikit-learn, ... are
# there; docs/benchmarks.md, "GPU check"), small enough to travel with the working tree:
#
#   bash bench/gpu_wheels.sh [DIR]     (default .whl; bench/gpu_check.sh --prepare calls it)
#
# GPU_WHEELS_PYTHON=3.11 fetches them for another Python (a rehearsal on a machine without 3.12).
#
# Ray's wheel is repacked without what the pipeline never loads (its Java jars, RLlib, Serve,
# the LLM library, the dashboard's web client and source maps) and without its own copy of
# aiohttp for the runtime-env agent, which then imports the image's: 79 MB -> about 37 MB.
# MLflow comes as mlflow-skinny (the `mlflow` wheel adds only the tracking server's web UI),
# without what its SQLite store needs (SQLAlchemy, Alembic, cryptography: bench/gpu_check.py
# gives the stages a file store). No DVC (its dependencies would not fit
# beside Ray; bench/gpu_check.py runs the stages' own commands) and no ffmpeg (--prepare makes
# what needs it). Versions are the ones installed here, so that both machines run the same.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
PYTHON=${PYTHON:-python3}
TARGET=${GPU_WHEELS_PYTHON:-3.12}  # the GPU image's Python

# name==version of each package as installed here (the project's venv).
pinned() {
  "$PYTHON" - "$@" << 'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
}

PACKAGES=(
  # Ray Data / Train / Tune beyond the image
  jsonschema referencing rpds-py jsonschema-specifications tensorboardX pydantic pydantic-core
  annotated-types typing-inspection
  # MLflow tracking into a file store
  mlflow-skinny fastapi starlette cachetools opentelemetry-api opentelemetry-sdk
  opentelemetry-proto opentelemetry-semantic-conventions sqlparse python-dotenv gitpython gitdb
  smmap importlib-metadata zipp
  # mlflow asks importlib for `databricks.agents`, which raises without a `databricks` package
  databricks-sdk
  # audio: librosa and what it loads; PANNs' front end
  librosa soxr audioread pooch soundfile cffi pycparser decorator platformdirs torchlibrosa
  # profiles (pipeline/profiles.py)
  ruamel.yaml
)

dl() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}

rm -rf "$out"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
line=$(pinned ray "${PACKAGES[@]}")
read -r -a pins <<< "$line"
dl "$tmp" "${pins[0]}"
(
  cd "$tmp"
  mkdir x
  cd x
  unzip -q ../ray-*.whl
  rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build \
    ray/_private/runtime_env/agent/thirdparty_files
  find ray/dashboard -name '*.map' -delete
  # The wheel's RECORD lists the removed files; pip only reads it to uninstall.
  zip -q -r -9 ../trim.zip .
)
cp "$tmp/trim.zip" "$out/$(basename "$tmp"/ray-*.whl)"
dl "$out" "${pins[@]:1}"
du -sh "$out"
