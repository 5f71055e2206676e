"""The layers: the trainers and everything they stand on never import the built-in task (engine/task/), and
kernels/ never imports engine/. Checked on a fresh interpreter, transitively, through sys.modules."""
import subprocess
import sys

BELOW_THE_STAGES = ["engine.trainers.lm", "engine.trainers.reward", "engine.trainers.ppo", "engine.trainers.loop",
                    "engine.models", "engine.loading", "engine.rollout", "engine.rollout.hf", "engine.data.formats",
                    "engine.data.encode", "engine.checkpoint", "engine.export", "engine.kl_control"]


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
