"""Wheels for the GPU machine, which reaches no package index: what a requirement needs that the device image
lacks, found here by walking Requires-Dist from the requirement down, against the image's package list
(bench/gpu/device-packages.txt, from the device tool's KINDS.md), and split into parts that fit one call.

    python -m bench.gpu.carry vllm==0.22.0 --dest .whl-vllm      # here: download, list, split into parts

It prints what is missing with sizes, and writes parts of at most --part-mib MiB under DEST/part-NN/ (carry
one per device call, while the machine is held); on the device, `bash bench/gpu/run.sh vllm-receive` stores
each and `bash bench/gpu/run.sh vllm-install` joins and installs them (README.md, "vLLM").
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the image is Ubuntu 24.04 (glibc 2.39): any manylinux tag up to 2_39 runs there; pip needs each one named
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64",
                                                                                      "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    return {canonical(line.split("#")[0].strip()) for line in (HERE / "device-packages.txt").read_text().splitlines()
            if line.split("#")[0].strip()}


def download(requirement: str, dest: Path) -> Path | None:
    """One wheel for Python 3.12 on manylinux x86-64, no dependencies; None when there is none."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest), requirement]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        return None
    new = set(dest.glob("*.whl")) - before
    name = canonical(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
    matches = [w for w in (new or dest.glob("*.whl")) if canonical(w.name.split("-")[0]) == name]
    return matches[0] if matches else None


def requirements(wheel: Path) -> list[str]:
    """Its Requires-Dist that apply on the device (Python 3.12, Linux x86-64), extras left out."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    out = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line[len("Requires-Dist:"):].strip().partition(";")
        if "extra ==" in marker or ("python_version" in marker and not _py312(marker)):
            continue
        if "platform_machine" in marker and "x86_64" not in marker:
            continue
        if ("sys_platform" in marker and "linux" not in marker) or re.search(r'platform_system\s*==\s*"(Windows|Darwin)"', marker):
            continue
        out.append(req.strip())
    return out


def _py312(marker: str) -> bool:
    m = re.search(r'python_version\s*([<>=!]+)\s*"(\d+)\.(\d+)"', marker)
    if not m:
        return True
    op, want = m.group(1), (int(m.group(2)), int(m.group(3)))
    have = (3, 12)
    return {"<": have < want, "<=": have <= want, ">": have > want, ">=": have >= want, "==": have == want,
            "!=": have != want}.get(op, True)


def closure(root: str, dest: Path, skip: set[str] = frozenset()) -> tuple[list[Path], list[str]]:
    """(wheels the device lacks for `root`, requirements with no wheel for it); names in `skip` are left out."""
    have = device_packages() | {canonical(n) for n in skip}
    first = canonical(re.split(r"[<>=!~\[; ]", root, maxsplit=1)[0])
    todo, seen, wheels, missing = [root], set(), [], []
    while todo:
        req = todo.pop()
        name = canonical(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])
        if name in seen or (name in have and name != first):
            continue
        seen.add(name)
        wheel = download(req, dest)
        if wheel is None:
            missing.append(req)
            continue
        wheels.append(wheel)
        todo += requirements(wheel)
    return wheels, missing


def split(wheels: list[Path], dest: Path, part_mib: int) -> list[Path]:
    """All wheels as one byte stream cut into parts of at most part_mib MiB (a manifest says how to rejoin)."""
    names = [w.name for w in wheels]
    (dest / "MANIFEST").write_text("".join(f"{w.name} {w.stat().st_size}\n" for w in wheels))
    parts, n, size, current = [], 0, part_mib * 2**20, None
    written = size
    for w in wheels:
        with open(w, "rb") as f:
            while chunk := f.read(2**20):
                if written >= size:
                    if current:
                        current.close()
                    folder = dest / f"part-{n:02d}"
                    folder.mkdir(exist_ok=True)
                    current, written, n = open(folder / "data", "wb"), 0, n + 1
                    parts.append(folder)
                current.write(chunk)
                written += len(chunk)
    if current:
        current.close()
    assert len(names) == len(set(names))
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.carry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("requirement", help="e.g. vllm==0.22.0")
    ap.add_argument("--dest", default=".whl-vllm")
    ap.add_argument("--part-mib", type=int, default=56, help="largest part (a call carries 64 MiB in all)")
    ap.add_argument("--skip", default="", help="comma-separated packages to leave out (say, an optional kernel "
                                                "library too large to carry)")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    (dest / "wheels").mkdir(parents=True, exist_ok=True)
    wheels, missing = closure(args.requirement, dest / "wheels", {n for n in args.skip.split(",") if n})
    total = sum(w.stat().st_size for w in wheels)
    for w in sorted(wheels, key=lambda w: -w.stat().st_size):
        print(f"{w.stat().st_size / 2**20:9.1f} MiB  {w.name}")
    print(f"{len(wheels)} wheels the device lacks, {total / 2**20:.0f} MiB in all")
    if missing:
        print("no wheel for Python 3.12 manylinux x86-64: " + ", ".join(missing))
    parts = split(wheels, dest, args.part_mib)
    print(f"{len(parts)} parts of at most {args.part_mib} MiB under {dest}/part-NN: one device call each")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
