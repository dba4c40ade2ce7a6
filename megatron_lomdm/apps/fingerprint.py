"""Fingerprints: what identifies a run's model at its loaded checkpoint, so a number (a NELBO, a
sample) can be traced to what made it. Shared by evaluation and sampling.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from megatron_lomdm.data.shards import read_manifest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(folder: str | Path) -> dict[str, Any]:
    """sha256 over every file of a checkpoint folder (relative path + content hash, sorted).

    Returns:
        ``{"step", "folder", "sha256", "num_files", "num_bytes"}``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    total = 0
    for path in files:
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{_sha256_file(path)}\n".encode())
        total += path.stat().st_size
    step = int(folder.name[5:]) if folder.name.startswith("step_") and folder.name[5:].isdigit() else None
    return {"step": step, "folder": str(folder.resolve()), "sha256": digest.hexdigest(), "num_files": len(files),
            "num_bytes": total}


def _code_version() -> dict[str, Any]:
    import megatron_lomdm

    out: dict[str, Any] = {"megatron_lomdm": megatron_lomdm.__version__, "torch": torch.__version__}
    try:
        import megatron.core

        out["megatron_core"] = getattr(megatron.core, "__version__", None)
    except Exception:  # noqa: BLE001
        pass
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        out["git_commit"] = ref
    except OSError:
        pass
    return out


def run_fingerprint(run: Any, *, use_ema: bool, hash_checkpoint: bool = True) -> dict[str, Any]:
    """What identifies a run's model at its loaded checkpoint (shared by evaluation and sampling).

    Collective-free; the checkpoint hash is computed on global rank 0 only (None elsewhere) and
    is spread by the caller (``broadcast_object``).
    """
    cfg, info = run.cfg, run.info
    step = run.state.step
    ckpt = {"step": step, "folder": str(run.ckpt.folder(step).resolve())}
    if hash_checkpoint and info.rank == 0:
        ckpt = checkpoint_fingerprint(run.ckpt.folder(step))
    d, m = cfg.diffusion, cfg.model
    manifest = read_manifest(cfg.data.train)
    return {
        "run_dir": str(Path(cfg.run.dir).resolve()),
        "checkpoint": ckpt,
        "weights": "ema" if use_ema else "live",
        "ema_decay": cfg.optim.ema_decay,
        "model": {"family": d.name, "c1": d.c1, "c2": d.c2, "block_size": d.block_size, "eps_t": d.eps_t,
                  "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_heads": m.num_heads,
                  "vocab_size": m.vocab_size, "mask_id": m.mask_id, "seq_length": m.seq_length},
        "train_data": {"fingerprint": manifest.fingerprint("train"),
                       "tokenizer_sha256": manifest.tokenizer.get("tokenizer_json_sha256")},
        "precision": cfg.train.precision,
        "layout": {"tp": info.tp, "pp": info.pp, "dp": info.dp, "world_size": info.world_size,
                   "backend": cfg.parallel.backend, "device": info.device.type},
        "code": _code_version(),
    }

