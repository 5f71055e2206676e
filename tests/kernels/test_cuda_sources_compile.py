"""Every CUDA source of csrc/ compiles, for sm_80, sm_90 and sm_100, on a machine without a GPU: a .cu that does
not compile fails CI the way a C++ one does (setup.py's optional build would only warn, and only on a GPU).

nvcc is the one on PATH when it is CUDA 12.8 or newer (sm_100), else NVIDIA's wheels from PyPI (CUDA 13.0,
as on the GPU machine: nvcc, its runtime, CCCL, crt and nvvm, ~270 MB) installed once into a cache folder.
The headers are this torch's (a CPU wheel ships ATen's and c10's CUDA headers) plus the one header a CPU
build does not generate, c10/cuda/impl/cuda_cmake_macros.h. Object files only: nothing is linked or run.
The test is skipped, saying why, only where no nvcc is found and none can be installed.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
ARCHS = ("80", "90", "100")
WHEELS = ["nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-cccl==13.0.*",
          "nvidia-cuda-crt==13.0.*", "nvidia-nvvm==13.0.*"]
# what setup.py's CUDAExtension adds around its own flags ("-O3", "-lineinfo")
FLAGS = [*COMMON_NVCC_FLAGS, "-std=c++20", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_API_INCLUDE_EXTENSION_H",
         "-DTORCH_EXTENSION_NAME=_C"]


def _version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


@pytest.fixture(scope="session")
def nvcc() -> str:
    found = shutil.which("nvcc")
    if found and (_version(found) or (0, 0)) >= (12, 8):
        return found
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf-engine" / "cuda-13.0"
    local = cache / "nvidia" / "cu13" / "bin" / "nvcc"
    if not local.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(cache), *WHEELS],
                              capture_output=True, text=True)
        if done.returncode != 0 or not local.is_file():
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"no nvcc >= 12.8 on PATH ({found or 'none'}) and NVIDIA's wheels could not be installed "
                        f"({why[:200]})")
    return str(local)


def test_every_cuda_source_compiles_for_sm80_sm90_sm100(nvcc, tmp_path):
    assert SOURCES, "csrc/ holds no .cu file"
    generated = tmp_path / "include" / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in [*include_paths(), tmp_path / "include", ROOT / "csrc"]]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    jobs = {}
    for src in SOURCES:  # both at once: each spends ~40 s in the host compiler on torch's headers
        obj = tmp_path / f"{src.stem}.o"
        cmd = [nvcc, "-c", str(src), "-o", str(obj), *FLAGS, *includes, *gencode]
        jobs[src] = (obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    failed = []
    for src, (obj, proc) in jobs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failed.append(f"{src.name}:\n{out[-4000:]}")
            continue
        data = obj.read_bytes()
        missing = [a for a in ARCHS if f"sm_{a}".encode() not in data]
        assert not missing, f"{obj.name} holds no code for sm_{missing}"
    assert not failed, "nvcc " + _version_text(nvcc) + " failed on:\n" + "\n".join(failed)


def _version_text(nvcc: str) -> str:
    v = _version(nvcc)
    return f"{v[0]}.{v[1]}" if v else "?"
