"""The imports run one way: no circle anywhere in engine/, kernels/ or bench/, and no private name (`_x`) taken
from another module. Read from the source (AST), so a function-level import counts as much as a top-level one."""
from pathlib import Path

import pytest

from import_graph import arrows, cycles, private_attributes

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["engine", "kernels", "bench"]


def test_no_import_circles():
    found = cycles(arrows(ROOT, PACKAGES))
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_private_name_crosses_a_module_boundary():
    private = [f"{a.source} (line {a.line}) imports {a.name} from {a.target}" for a in arrows(ROOT, PACKAGES)
               if a.name and a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private
    reached = private_attributes(ROOT, PACKAGES)  # the same through a module's attribute: dist._WORLD
    assert not reached, reached


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_planted_circle_is_found_and_named(tmp_path):
    """A fake tree: a -> b at module level, b -> c inside a function, c -> a through a relative import of a
    package's module; d imports a one way only."""
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import g\n    return g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\n",
        "pkg/d.py": "import pkg.a as a\n",
    })
    found = cycles(arrows(root, ["pkg"]))
    assert found == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    (root / "pkg/sub/c.py").write_text("x = 1\n")  # the arrow back removed: no circle
    assert cycles(arrows(root, ["pkg"])) == []


def test_two_circles_are_both_named(tmp_path):
    root = _tree(tmp_path, {"p/__init__.py": "", "p/x.py": "from .y import f\n", "p/y.py": "from .x import g\n",
                            "p/m.py": "import p.n\n", "p/n.py": "from p.m import h\n"})
    assert cycles(arrows(root, ["p"])) == [["p.m", "p.n", "p.m"], ["p.x", "p.y", "p.x"]]


@pytest.mark.parametrize("line, private", [("from .a import _hidden\n", True), ("from .a import shown\n", False),
                                            ("from . import _mod\n", False), ("from .a import __version__\n", False)])
def test_private_names_are_told_from_private_modules(tmp_path, line, private):
    root = _tree(tmp_path, {"q/__init__.py": "", "q/a.py": "_hidden = shown = __version__ = 1\n",
                            "q/_mod.py": "", "q/b.py": line})
    names = [a.name for a in arrows(root, ["q"]) if a.name and a.name.startswith("_") and not a.name.startswith("__")]
    assert bool(names) == private, names


def test_a_private_attribute_of_an_imported_module_is_found(tmp_path):
    root = _tree(tmp_path, {"r/__init__.py": "", "r/a.py": "_state = 1\nshown = 2\n",
                            "r/b.py": "from . import a\nimport r.a as ra\nx = a._state + ra.shown\ny = ra._state\n"})
    assert private_attributes(root, ["r"]) == ["r.b (line 3) uses r.a._state", "r.b (line 4) uses r.a._state"]
