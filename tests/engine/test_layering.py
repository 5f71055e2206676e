"""The layers: every package of engine/ imports only the packages below it (read from the source, AST), the
trainers and everything they stand on never import the built-in task (engine/task/), and kernels/ never
imports engine/ (both also checked on a fresh interpreter, transitively, through sys.modules)."""
import subprocess
import sys
from pathlib import Path

from import_graph import arrows, modules

ROOT = Path(__file__).resolve().parents[2]
TOP = ["engine", "engine.__main__", "engine.cli", "engine.commands", "engine.context", "engine.stages", "engine.gold",
       "engine.reproduce", "engine.reward_fn"]
# bottom first; a package may import its own modules and those of lower layers, never a layer's neighbour
LAYERS = [
    ["kernels"],
    ["engine.config", "engine.seeds", "engine.user_code"],
    ["engine.overopt"],
    ["engine.parallel"],
    ["engine.data"],
    ["engine.models"],
    ["engine.rundir"],
    ["engine.rollout"],
    ["engine.episodes"],
    ["engine.trainers"],
    ["engine.task"],
    ["engine.plan", "engine.label"],
    TOP,
]
BELOW_THE_STAGES = ["engine.trainers.lm", "engine.trainers.reward", "engine.trainers.ppo", "engine.trainers.loop",
                    "engine.trainers.dpo", "engine.models.forward", "engine.models.loading", "engine.rollout",
                    "engine.rollout.hf", "engine.data.formats", "engine.data.encode", "engine.rundir.checkpoint",
                    "engine.rundir.final", "engine.rundir.export", "engine.trainers.kl_control"]


def group_of(module: str) -> str | None:
    """The package (or top-level module) of `module` that LAYERS places."""
    if module in TOP:
        return "top"
    best = None
    for layer in LAYERS:
        for name in layer:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
                best = name
    return best


def layer_of(group: str) -> int:
    return len(LAYERS) - 1 if group == "top" else next(i for i, layer in enumerate(LAYERS) if group in layer)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules(ROOT, ["engine", "kernels"]) if group_of(m) is None)
    assert not unplaced, f"place these in LAYERS (and say why in their package's docstring): {unplaced}"


def test_packages_import_only_downward():
    wrong = []
    for a in arrows(ROOT, ["engine", "kernels"]):
        src, dst = group_of(a.source), group_of(a.target)
        if src != dst and layer_of(dst) >= layer_of(src):
            wrong.append(f"{a.source} (line {a.line}) imports {a.target}: {src} may not import {dst}")
    assert not wrong, "\n".join(wrong)


def imported_after(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_nothing_below_the_stages_imports_the_builtin_task():
    loaded = imported_after(BELOW_THE_STAGES)
    assert not {m for m in loaded if m == "engine.task" or m.startswith("engine.task.")}, sorted(loaded)


def test_kernels_never_import_the_engine():
    loaded = imported_after(["kernels", "kernels.ops", "kernels.losses", "kernels.stats", "kernels.reference"])
    assert not {m for m in loaded if m == "engine" or m.startswith("engine.")}


def test_no_file_in_engine_is_longer_than_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "engine").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these by concern (engine/trainers/ppo.py shows how): {long}"
