"""What a comparison of runs filters on: MLflow tags and a run name that says what the run is."""

from __future__ import annotations

import subprocess
from pathlib import Path

from megatron_lomdm.config import Config
from megatron_lomdm.config.families import FAMILY_SPECS

REPO = Path(__file__).resolve().parents[2]


def git_state(root: Path = REPO) -> tuple[str, bool | None]:
    """(HEAD sha, dirty) of the checkout holding the code; ("unknown", None) outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return "unknown", None
    status = git("status", "--porcelain", "--untracked-files=no")
    return sha.strip(), None if status is None else bool(status.strip())


def _reads(family: str, key: str) -> bool:
    """Whether a family's rules read `diffusion.<key>` (c1, c2 mean something for it)."""
    spec = FAMILY_SPECS.get(family)
    return spec is not None and any(key in rule.reads for rule in spec.rules)


def layout(tp: int, pp: int, dp: int) -> str:
    """``tp1_pp1_dp2``: the model-parallel layout."""
    return f"tp{tp}_pp{pp}_dp{dp}"


def default_run_name(cfg: Config, *, tp: int, pp: int, dp: int, num_corruptions: int) -> str:
    """E.g. ``lomdm-c1=0.7-c2=0.65-K2-tp1pp1dp2`` (sequence parallelism ``sp``, virtual pipeline
    stages ``vp<n>``, ZeRO and DeepSpeed appended when used); c1/c2 only for families that read
    them, K only when above 1."""
    d, par = cfg.diffusion, cfg.parallel
    parts = [d.name]
    parts += [f"c1={d.c1:g}"] if _reads(d.name, "c1") else []
    parts += [f"c2={d.c2:g}"] if _reads(d.name, "c2") else []
    parts += [f"K{num_corruptions}"] if num_corruptions > 1 else []
    parts.append(f"tp{tp}pp{pp}dp{dp}")
    parts += ["sp"] if par.sequence_parallel else []
    parts += [f"vp{par.virtual_stages}"] if par.virtual_stages > 1 else []
    parts += [f"zero{par.zero}"] if par.zero else []
    parts += [par.backend] if par.backend != "megatron" else []
    return "-".join(parts)


def run_tags(cfg: Config, *, tp: int, pp: int, dp: int, num_corruptions: int,
             data_fingerprint: str) -> dict[str, str]:
    """Tags for filtering and comparing runs (MLflow tags are strings).

    Args:
        cfg: The resolved config.
        tp, pp, dp: The layout the run trains with.
        num_corruptions: K, the corruptions per sequence the family really uses.
        data_fingerprint: The training data manifest's fingerprint.
    """
    d, m, par = cfg.diffusion, cfg.model, cfg.parallel
    sha, dirty = git_state()
    return {"family": d.name, "c1": f"{d.c1:g}", "c2": f"{d.c2:g}", "K": str(num_corruptions),
            "layers": str(m.num_layers), "hidden": str(m.hidden_size), "seq_length": str(m.seq_length),
            "layout": layout(tp, pp, dp), "sequence_parallel": str(par.sequence_parallel).lower(),
            "virtual_stages": str(par.virtual_stages), "zero": str(par.zero), "backend": par.backend,
            "precision": cfg.train.precision, "git_sha": sha,
            "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
            "data": data_fingerprint[:16], "data_manifest": data_fingerprint}
