"""Kiln: train language models through every stage of their life, in JAX."""
from setuptools import find_packages, setup

# The CPU development set (Python 3.11) is pinned exactly; Python >= 3.12 (the GPU machines)
# admits the jax 0.11 line with the library versions that go with it.
PY311 = 'python_version < "3.12"'
PY312 = 'python_version >= "3.12"'

setup(
    name="kiln-lm",
    version="0.1.0",
    description="One JAX/Flax codebase for every stage of a language model's life.",
    python_requires=">=3.11",
    packages=find_packages(include=["model*", "train*", "data*", "configs*", "launch*", "benchmarks*"]),
    install_requires=[
        f"jax==0.10.2; {PY311}",
        f"jaxlib==0.10.2; {PY311}",
        f"jax>=0.10.2,<0.12; {PY312}",
        f"jaxlib>=0.10.2,<0.12; {PY312}",
        f"flax==0.12.8; {PY311}",
        f"flax>=0.12.8,<0.13; {PY312}",
        "optax==0.2.8",
        f"orbax-checkpoint==0.12.8; {PY311}",
        f"orbax-checkpoint>=0.12.8,<0.13; {PY312}",
        "grain==0.2.18",
        "sentencepiece==0.2.3",
        "tokenizers>=0.21,<0.24",
        "ml-collections==1.1.0",
        "safetensors>=0.4.5,<0.9",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch==2.13.0 resolves to the CPU build offered locally; a bare `torch` pulls CUDA wheels.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0", "transformers>=4.57,<6", "peft>=0.17,<0.22",
                 "lm-eval>=0.4.8,<0.5"],
        # Kiln models in EleutherAI's lm-evaluation-harness (train/harness.py).
        "eval": ["lm-eval>=0.4.8,<0.5"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.12"],
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    },
    entry_points={"console_scripts": ["kiln=launch.main:cli"]},
)
