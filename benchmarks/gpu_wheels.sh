#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh installs on a GPU machine whose python3 (3.12) has torch,
# transformers, accelerate, pytest and matplotlib, but not these. Run here, with network access;
# .whl/ is ignored by git and travels to the machine through the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# ipython and what it needs beyond the image, ipywidgets and its two front-end packages, ruamel.yaml
WHEELS=(
    ipython==9.19.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 parso==0.8.7
    matplotlib-inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 wcwidth==0.9.5
    stack_data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4 traitlets==5.16.1
    ipywidgets==8.1.9 comm==0.2.3 widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17
    ruamel.yaml==0.19.1
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls .whl
