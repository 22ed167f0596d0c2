"""The layering the README promises: tools -> pretrain -> ringmoe, never the other way.

The library (`ringmoe/`) must import neither the trainer (`pretrain/`), nor the
experiment configs (`configs/`), nor the command-line tools (`tools/`): checked
statically (every import statement, including ones inside functions) and by
importing every ringmoe module with those packages made unimportable."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("pretrain", "configs", "tools")


def _imports(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_no_library_module_imports_the_layers_above():
    offences = []
    for root, _, files in os.walk(os.path.join(REPO, "ringmoe")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                offences += [f"{os.path.relpath(path, REPO)}:{line}: {module}"
                             for line, module in _imports(path) if module.split(".")[0] in FORBIDDEN]
    assert not offences, "ringmoe imports a layer above it:\n" + "\n".join(offences)


BLOCKED_IMPORT = f'''
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError("ringmoe imported " + name)

sys.meta_path.insert(0, Blocked())
import ringmoe
names = [m.name for m in pkgutil.walk_packages(ringmoe.__path__, "ringmoe.")]
for name in names:
    importlib.import_module(name)
print(len(names))
'''


def test_every_library_module_imports_without_the_layers_above():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 40            # every module was walked, not just the package
