"""Build megatron_ext and its native module `megatron_ext._native` (pybind11, C++17)."""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

native = Pybind11Extension(
    "megatron_ext._native",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megatron_ext",
    version="0.1.0",
    description="Learnable N:M (MaskLLM) sparsity for LLaMA models on megatron-core",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=["numpy", "sentencepiece", "tokenizers"],
    extras_require={
        # torch is left unpinned here so a GPU machine keeps its own build; the Makefile
        # installs the CPU wheel first on a machine without torch.
        "train": ["torch", "megatron-core==0.16.1", "safetensors", "gguf"],
        "test": ["pytest", "transformers", "safetensors", "gguf"],
        # optional: pictures (tools/plot_run.py, tools/plot_schedule.py), Weights & Biases logging
        "plot": ["matplotlib"],
        "wandb": ["wandb"],
    },
)
