"""The HF export ships the project's own OeMDM code, never a copy of a formula (issue 18, item 5).

``checkpoint/hf_code.py`` copies the modules ``hf_modeling/oemdm_math.py`` imports (the pure
``diffusion/`` math, the family rules and the ancestral sampler) into the export, changing only
their project imports into relative ones. These tests fail if a shipped file drifts from its
package module, if ``modeling_lomdm.py`` grows its own copy of a formula or a switch on the
family's name, or if the shipped folder stops loading without ``megatron_lomdm``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_lomdm.checkpoint import hf_code
from megatron_lomdm.config.families import FAMILY_SPECS

MODELING_DIR = Path(hf_code.__file__).resolve().parent / "hf_modeling"
MODELING = MODELING_DIR / "modeling_lomdm.py"
# Formulas whose home is diffusion/ or sampling/ (earlier exports carried copies of these).
FORMULAS = {"normsig", "spread_exponents", "power_schedule", "power_unmask_prob", "slot_log_mask_prob",
            "sampling_log_probs", "gumbel_argmax", "expected_token_rate", "token_exponents",
            "uniform_grid", "sampling_time_grid", "_unmask_prob", "_denoise", "compute_dtype"}


def _code_constants(tree: ast.AST) -> set[str]:
    """String constants of ``tree`` that are not docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


def _defined(tree: ast.AST) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_shipped_files_are_the_package_modules_with_relative_imports() -> None:
    """Byte for byte the package's modules, except for their ``from megatron_lomdm...`` lines."""
    sources = hf_code.shipped_sources()
    modules = hf_code.shipped_modules()
    assert {"megatron_lomdm.diffusion.registry", "megatron_lomdm.diffusion.lomdm",
            "megatron_lomdm.sampling.ancestral"} <= set(modules)
    for module in modules:
        original = hf_code.module_path(module).read_text().splitlines(keepends=True)
        shipped = sources[f"{hf_code.flat_name(module)}.py"].splitlines(keepends=True)
        assert len(shipped) == len(original), module
        for old, new in zip(original, shipped):
            if old != new:
                assert old.lstrip().startswith("from megatron_lomdm."), (module, old)
                imported = old.split()[1]
                assert new == old.replace(f"from {imported} import", f"from .{hf_code.flat_name(imported)} import", 1)


def test_shipped_code_imports_only_torch_and_itself() -> None:
    sources = hf_code.shipped_sources()
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in sources, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                tops = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module.split(".")[0]]
                for top in tops:
                    assert top in sys.stdlib_module_names or top in ("torch", "scipy"), (name, top)


def test_modeling_file_has_no_formula_copy_and_no_family_switch() -> None:
    tree = ast.parse(MODELING.read_text())
    shipped_functions = set()
    for text in hf_code.shipped_sources().values():
        shipped_functions |= {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    top_level = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not top_level & shipped_functions, top_level & shipped_functions
    assert not _defined(tree) & FORMULAS, _defined(tree) & FORMULAS
    names = set(FAMILY_SPECS)
    assert not _code_constants(tree) & names, "modeling_lomdm.py switches on a family name"
    config_tree = ast.parse((MODELING_DIR / "configuration_lomdm.py").read_text())  # rules come from the registry
    compared = {c.value for node in ast.walk(config_tree) if isinstance(node, ast.Compare)
                for c in ast.walk(node) if isinstance(c, ast.Constant)}
    assert not compared & names, "configuration_lomdm.py switches on a family name"
    family_classes = {n for text in hf_code.shipped_sources().values() for n in _defined(ast.parse(text))
                      if n.endswith("Family")} - {"DiffusionFamily"}  # the interface is fine; a member is not
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not used & family_classes, f"modeling_lomdm.py names family classes: {used & family_classes}"


_LOAD = hf_code.NO_PROJECT_IMPORTS + r"""
sys.path.insert(0, sys.argv[1])
import torch
from exported.modeling_lomdm import LoMDMForMaskedDiffusion
from exported.configuration_lomdm import LoMDMConfig

for family in ("lomdm", "genmd4", "multivariate", "bd3lm"):
    cfg = LoMDMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16, family=family, c1=0.7, c2=0.5, block_size=4, mask_id=3)
    model = LoMDMForMaskedDiffusion(cfg).eval()
    out = model.generate(num_samples=2, steps=4, seed=0, return_dict=True)
    assert out["sequences"].shape == (2, 16) and not bool((out["sequences"] == 3).any()), family
print("loaded")
"""


def test_shipped_folder_loads_without_the_package(tmp_path: Path) -> None:
    """The files an export holds import and sample with ``megatron_lomdm`` unimportable, and
    transformers' loader finds every shipped file from ``modeling_lomdm.py``."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = tmp_path / "exported"
    folder.mkdir()
    for name in ("modeling_lomdm.py", "configuration_lomdm.py"):  # what save_pretrained copies
        shutil.copyfile(MODELING_DIR / name, folder / name)
    written = hf_code.write_shipped_code(folder)
    (folder / "__init__.py").write_text("")
    found = {Path(p).name for p in get_relative_import_files(str(folder / "modeling_lomdm.py"))}
    assert set(written) <= found | {"oemdm_math.py"} and "oemdm_math.py" in found, set(written) - found
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
