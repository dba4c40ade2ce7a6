"""The project code an HF export ships: the pure ``diffusion/`` math and the ancestral sampler.

The exported model (``hf_modeling/modeling_lomdm.py``) runs in a process without
``megatron_lomdm``, yet it must use the project's own formulas, not a copy of them. It imports them
from one sibling module, ``hf_modeling/oemdm_math.py``, whose imports name the project modules it
needs. ``write_shipped_code`` copies every project module those imports reach (recursively) into
the export folder, flattened (``megatron_lomdm.diffusion.base`` -> ``diffusion_base.py``), and
rewrites each ``from megatron_lomdm.X.Y import ...`` line to ``from .X_Y import ...`` — the one
change made to the files. ``transformers``' dynamic module loader follows such relative imports
(``dynamic_module_utils.get_relative_import_files``), so ``from_pretrained(...,
trust_remote_code=True)`` loads them with the model. The shipped modules must import only the
standard library, torch and each other (tests/unit/test_hf_code.py checks it).

Standard library only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_NAME = "megatron_lomdm"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
HF_MODELING = f"{PACKAGE_NAME}.checkpoint.hf_modeling"
ENTRY = f"{HF_MODELING}.oemdm_math"
"""The module of ``hf_modeling`` whose imports name what the export ships."""

NO_PROJECT_IMPORTS = f"""
import importlib.abc, sys

class _NoProjectImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("{PACKAGE_NAME}", "megatron"):
            raise ImportError(f"the export must not need {{name}}")
        return None

sys.meta_path.insert(0, _NoProjectImports())
"""
"""The opening of a fresh-process script that proves an export loads without this package (or
megatron): importing either raises ImportError."""


def module_path(module: str) -> Path:
    """The source file of a project module (``megatron_lomdm.a.b`` -> ``<package>/a/b.py``).

    Raises:
        ValueError: If ``module`` is not a plain module of the package (a package ``__init__``
            would pull in its whole folder).
    """
    parts = module.split(".")
    path = PACKAGE_DIR.joinpath(*parts[1:]).with_suffix(".py")
    if parts[0] != PACKAGE_NAME or len(parts) < 3 or not path.is_file():
        raise ValueError(f"the HF export ships plain modules of {PACKAGE_NAME}/ only; cannot ship {module!r}")
    return path


def flat_name(module: str) -> str:
    """The file stem of ``module`` in the export folder: ``hf_modeling`` modules keep their name,
    the others join their path with ``_`` (``megatron_lomdm.diffusion.base`` -> ``diffusion_base``)."""
    if module.startswith(HF_MODELING + "."):
        return module.rsplit(".", 1)[1]
    return "_".join(module.split(".")[1:])


def project_imports(source: str, where: str) -> dict[int, str]:
    """``{line number: imported module}`` of every ``from megatron_lomdm... import`` in ``source``.

    Raises:
        ValueError: For any other form of project import (``import megatron_lomdm...``, relative).
    """
    found: dict[int, str] = {}
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE_NAME for a in node.names):
            raise ValueError(f"{where}:{node.lineno}: write `from {PACKAGE_NAME}.X.Y import name` to be shippable")
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{where}:{node.lineno}: relative imports are not shippable")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE_NAME:
            found[node.lineno] = node.module
    return found


def shipped_modules(entry: str = ENTRY) -> list[str]:
    """``entry`` and every project module it imports, recursively (sorted)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            path = module_path(module)
            todo += project_imports(path.read_text(), str(path)).values()
    return sorted(seen)


def rewrite_imports(source: str, where: str) -> str:
    """``source`` with each ``from megatron_lomdm.X.Y import`` statement made ``from .X_Y import``."""
    lines = source.splitlines(keepends=True)
    for lineno, module in project_imports(source, where).items():
        old = f"from {module} import"
        if old not in lines[lineno - 1]:
            raise ValueError(f"{where}:{lineno}: write `{old} ...` on one line to be shippable")
        lines[lineno - 1] = lines[lineno - 1].replace(old, f"from .{flat_name(module)} import", 1)
    return "".join(lines)


def shipped_sources(entry: str = ENTRY) -> dict[str, str]:
    """``{file name in the export: text}`` of every shipped module."""
    out = {}
    for module in shipped_modules(entry):
        path = module_path(module)
        out[f"{flat_name(module)}.py"] = rewrite_imports(path.read_text(), str(path))
    return out


def write_shipped_code(folder: Path, entry: str = ENTRY) -> list[str]:
    """Write the shipped modules into the export ``folder`` (replacing the as-is copy of ``entry``
    that ``save_pretrained`` made); returns their file names."""
    sources = shipped_sources(entry)
    for name, text in sources.items():
        (Path(folder) / name).write_text(text)
    return sorted(sources)
