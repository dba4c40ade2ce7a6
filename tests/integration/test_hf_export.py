"""HF export / import (issue 10, point 5): native checkpoints of any TP x PP layout <-> the
self-contained ``trust_remote_code`` model of ``megatron_lomdm.checkpoint.hf_modeling``.

One tiny lomdm training run per layout (module-scoped): TP=1 (one process), TP=2 (torchrun) and
PP=2 (the TP=1 checkpoint split into two stage files by ``split_pp2`` below, the inverse of the
converter's merge). Exports are verified against the native model rebuilt at TP=1; the HF side is
always loaded in a fresh process with ``trust_remote_code=True`` and no project imports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from megatron_lomdm.apps import hf_export
from tests.helpers import zygote

ROOT = Path(__file__).resolve().parents[2]
TINY = "configs/experiments/tiny_cpu.yaml"
STEPS = 4


def _env(hf_home: Path) -> dict[str, str]:
    env = hf_export.fresh_process_env(hf_home)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], hf_home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`cmd` to success: a `python -c` script (what loads an export with `transformers`) as a fresh
    process, the project's commands through the fork server (tests/helpers/zygote.py; the export's
    --verify still loads it in a fresh process of its own)."""
    fresh = cmd[1:2] == ["-c"]
    out = zygote.run(cmd, env=_env(hf_home), cwd=ROOT, timeout=timeout, fresh=fresh)
    assert out.returncode == 0, f"{cmd}\n{out.stderr[-4000:]}"
    return out


def _train(run_dir: Path, shards: Path, hf_home: Path, *overrides: str, nproc: int = 1) -> None:
    launcher = [sys.executable, "-m", "megatron_lomdm.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "megatron_lomdm.train"]
    _run([*launcher, "--config", TINY, f"run.dir={run_dir}", f"data.train={shards}",
          f"train.steps={STEPS}", "checkpoint.interval=0", *overrides], hf_home)


def split_pp2(shard: dict, num_layers: int) -> list[dict]:
    """Test helper: one TP=1/PP=1 shard -> two pipeline-stage shards (the stage key scheme).

    Stage 0: embedding + layers [0, n/2) as local 0..; stage 1: layers [n/2, n) as local 0..,
    final LayerNorm, LM head, heads and family. Stage 0 also gets a *stale* copy of the heads
    (zeros), as real PP runs hold an untrained copy there: the merge must take the last stage's.
    """
    half = num_layers // 2

    def place(key: str) -> tuple[int, str]:
        m = re.match(r"^backbone\.decoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            layer = int(m.group(1))
            stage = int(layer >= half)
            return stage, f"backbone.decoder.layers.{layer - stage * half}.{m.group(2)}"
        return (0 if key.startswith("backbone.embedding.") else 1), key

    stages = [{"ema": {"decay": shard["ema"]["decay"], "shadow": {}}} for _ in range(2)]
    if "model" in shard:  # the older rank-file format also held the live weights
        for stage in stages:
            stage["model"] = {}
    for part in ("model", "ema"):
        if part not in shard:
            continue
        source = shard[part]["shadow"] if part == "ema" else shard[part]
        for key, value in source.items():
            stage, local = place(key)
            targets = [(stage, value)]
            if not key.startswith("backbone.") and stage == 1:
                targets.append((0, torch.zeros_like(value)))  # stale stage-0 copy of a head
            for p, v in targets:
                (stages[p]["ema"]["shadow"] if part == "ema" else stages[p][part])[local] = v
    return stages


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="module")
def tp1_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("tp1") / "run"
    # ema_decay=1e-9 (1 - 1e-9 rounds to 1.0 in fp32): the EMA is kept and equals the live weights,
    # so the --no-ema path (dist/) can be checked against it (decay 0 disables the EMA altogether)
    _train(run_dir, tiny_shards, hf_home, "optim.ema_decay=1e-9", f"train.eval_interval={STEPS}",
           "train.eval_batches=1")
    return run_dir


@pytest.fixture(scope="module")
def tp1_export(tp1_run: Path, hf_home: Path) -> tuple[Path, dict]:
    """The TP=1 run exported through the CLI with --verify (EMA weights)."""
    out = tp1_run.parent / "hf"
    proc = _run([sys.executable, "tools/convert_to_hf.py", "--run-dir", str(tp1_run),
                 "--output", str(out), "--verify"], hf_home)
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def _check_export_folder(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_lomdm.py", "configuration_lomdm.py",
            "README.md", "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_lomdm.LoMDMForMaskedDiffusion"
    assert config["auto_map"]["AutoConfig"] == "configuration_lomdm.LoMDMConfig"
    assert config["family"] == "lomdm" and config["mask_id"] == 3 and config["vocab_size"] == 512
    modeling = (out / "modeling_lomdm.py").read_text()
    assert "megatron" not in re.sub(r'""".*?"""|#.*', "", modeling, flags=re.S).lower()
    # the project's own OeMDM modules ship beside it, unchanged but for relative imports
    from megatron_lomdm.checkpoint.hf_code import shipped_sources

    for name, text in shipped_sources().items():
        assert (out / name).read_text() == text, name
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temp folder left behind"


def test_export_verify_tp1(tp1_export: tuple[Path, dict]) -> None:
    out, result = tp1_export
    _check_export_folder(out)
    assert result["step"] == STEPS and result["ema"] and result["source_tp_pp"] == [1, 1]
    diffs = result["max_abs_diff"]
    assert set(diffs) == {"logits", "last_hidden_state", "reverse_exponents"}
    assert max(diffs.values()) < 1e-5, diffs
    card = (out / "README.md").read_text()
    assert f"| training steps (checkpoint) | {STEPS} |" in card
    assert f"Validation at step {STEPS}: NELBO" in card and "Verified against" in card
    assert re.search(r"\| data manifest fingerprint \| [0-9a-f]{64} \|", card)


@pytest.mark.slow
def test_export_verify_tp2(tiny_shards: Path, tmp_path: Path, hf_home: Path) -> None:
    run_dir = tmp_path / "run"
    _train(run_dir, tiny_shards, hf_home, "parallel.tp=2", nproc=2)
    dist_dir = run_dir / "checkpoints" / f"step_{STEPS:07d}" / "dist"
    chunks = FileSystemReader(str(dist_dir)).read_metadata().state_dict_metadata[
        "ema.backbone.output_layer.weight"].chunks  # the EMA is sharded like the weight it tracks
    vocab_rows = {chunk.sizes[0] for chunk in chunks}
    assert len(chunks) == 2 and vocab_rows == {256}  # a real vocabulary split
    result = hf_export.export_run(run_dir, tmp_path / "hf", verify=True)
    _check_export_folder(tmp_path / "hf")
    assert result.source_layout == (2, 1)
    assert max(result.max_abs_diff.values()) < 1e-5, result.max_abs_diff


def test_export_verify_pp2(tp1_run: Path, tp1_export: tuple[Path, dict], tmp_path: Path) -> None:
    from megatron_lomdm.config import load_config, save_config
    from megatron_lomdm.config.load import replace

    cfg = load_config(tp1_run / "config.yaml")
    pp_run = tmp_path / "run"
    save_config(replace(cfg, run={"dir": str(pp_run)}, parallel={"pp": 2}), pp_run / "config.yaml")
    folder = pp_run / "checkpoints" / f"step_{STEPS:07d}"
    folder.mkdir(parents=True)
    src = tp1_run / "checkpoints" / f"step_{STEPS:07d}"
    # a format-1 checkpoint (EMA in the rank files) of the same weights: the legacy reader's PP merge
    shadow = hf_export.weights_from_dist(cfg, src, ema=True)
    stages = split_pp2({"ema": {"decay": cfg.optim.ema_decay, "shadow": shadow}}, cfg.model.num_layers)
    for p, stage in enumerate(stages):
        torch.save(stage, folder / f"rank_000_{p:03d}.pt")
    torch.save({"step": STEPS, "tp": 1, "pp": 2, "format": 1}, folder / "meta.pt")
    (pp_run / "checkpoints" / "latest").write_text(folder.name + "\n")

    result = hf_export.export_run(pp_run, tmp_path / "hf", verify=True)
    assert result.source_layout == (1, 2)
    assert max(result.max_abs_diff.values()) < 1e-5, result.max_abs_diff
    # the merge is the exact inverse of the split: same tensors as the TP=1 export
    ref = load_file(str(tp1_export[0] / "model.safetensors"))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


_GENERATE = r"""
import json, sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
calls = []
model.model.register_forward_hook(lambda *a: calls.append(1))
out = model.generate(num_samples=4, steps=12, seed=7, return_dict=True)
again = model.generate(num_samples=4, steps=12, seed=7)
same = bool(torch.equal(out["sequences"], again))
print(json.dumps({"ids": out["sequences"].tolist(), "same": same, "num_calls": out["num_calls"],
                  "num_steps": out["num_steps"], "hooked": len(calls)}))
"""


def test_hf_generate_fresh_process(tp1_export: tuple[Path, dict], hf_home: Path) -> None:
    out = _run([sys.executable, "-c", _GENERATE, str(tp1_export[0])], hf_home)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    ids = torch.tensor(res["ids"])
    assert ids.shape == (4, 32)
    assert not bool((ids == 3).any()), "a [MASK] was left"
    assert bool((ids >= 0).all()) and bool((ids < 512).all())
    assert res["same"], "the same seed must give the same samples"
    assert 1 <= res["num_calls"] <= res["num_steps"] <= 12
    assert res["hooked"] == 2 * res["num_calls"]  # one backbone call per (uncached) step


def test_hf_native_roundtrip_exact(tp1_export: tuple[Path, dict], tiny_shards: Path,
                                   tmp_path: Path, hf_home: Path) -> None:
    """HF -> native run dir -> HF is bit-exact, and the imported run fine-tunes."""
    run_dir = tmp_path / "imported"
    _run([sys.executable, "tools/convert_to_hf.py", "--from-hf", str(tp1_export[0]),
          "--to-run-dir", str(run_dir), f"data.train={tiny_shards}"], hf_home)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000000"
    hf_export.export_run(run_dir, tmp_path / "hf2")
    ref = load_file(str(tp1_export[0] / "model.safetensors"))
    got = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert set(ref) == set(got)
    for key in ref:
        assert ref[key].dtype == got[key].dtype and torch.equal(ref[key], got[key]), key
    # the live weights saved through dist_checkpointing are the export's too
    live = hf_export.load_native_checkpoint(run_dir, ema=False).state_dict
    live_hf = hf_export.native_to_hf(live, vocab_size=512)
    assert set(live_hf) == set(ref) and all(torch.equal(v, ref[k]) for k, v in live_hf.items())
    # fine-tuning resumes from the imported step-0 checkpoint
    _run([sys.executable, "-m", "megatron_lomdm.train", "--config", str(run_dir / "config.yaml"),
          "train.steps=1"], hf_home)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["nelbo"] > 0


_FIRST_STEP_FROM_EXPORT = r"""
import json, sys, torch
from safetensors.torch import load_file
from megatron_lomdm.apps import hf_export
from tests.helpers import zygote
from megatron_lomdm.config import load_config
from megatron_lomdm.config.load import replace
from megatron_lomdm.training.build import build_run
from megatron_lomdm.training.step import forward_backward, reduce_reports

config, fresh_dir, export = sys.argv[1:4]
cfg = replace(load_config(config), run={"dir": fresh_dir}, tracking={"enabled": False})
run = build_run(cfg, read_only=True)  # a fresh initialisation: no checkpoint is read
batches = [next(run.train_iter) for _ in range(run.num_microbatches)]  # the fine-tune's first batch

def first_step():
    reports = forward_backward(run.engine, iter(batches), step=0, num_microbatches=len(batches),
                               seq_length=cfg.model.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                               device=run.device, forward_only=True)
    out = reduce_reports(reports, run.device)
    return {"nelbo": out.values["nelbo"], "loss": out.values["surrogate"], "num_tokens": out.num_tokens}

fresh = first_step()
full = hf_export.hf_to_native(load_file(export + "/model.safetensors"))  # the export's weights, not the checkpoint
model = run.model
model.load_state_dict(hf_export.slice_for_rank(model.state_dict(), full, tp_rank=0, tp=1,
                                               layer_numbers=list(range(cfg.model.num_layers)),
                                               vocab_size=cfg.model.vocab_size))
exported = first_step()
response = sum(int((b["valid"] & ~b["cond"].bool()).sum()) for b in batches)
prompt = sum(int((b["valid"] & b["cond"].bool()).sum()) for b in batches)
run.close()
print(json.dumps({"fresh": fresh, "exported": exported, "response_tokens": response, "prompt_tokens": prompt}))
"""


def test_finetune_imported_export_on_conditioned_data(tp1_export: tuple[Path, dict], tiny_cond_shards: Path,
                                                      tmp_path: Path, hf_home: Path) -> None:
    """Issue 19 §1, through the CLI: export -> ``--from-hf`` import onto conditioned shards
    (``--prompt-key``/``--response-key`` preprocessing: a ``cond`` member) -> ``python -m
    megatron_lomdm.train``. The fine-tune's first step is the export's: its loss equals the loss of
    the exported weights (read from model.safetensors, not the checkpoint) on the same batch and
    noise, not that of a fresh initialisation, and its token count is the batch's response tokens
    only (the prompt positions are excluded from the loss)."""
    run_dir = tmp_path / "ft"
    _run([sys.executable, "tools/convert_to_hf.py", "--from-hf", str(tp1_export[0]), "--to-run-dir", str(run_dir),
          f"data.train={tiny_cond_shards}", "train.steps=1", "train.log_interval=1", "train.eval_interval=0"],
         hf_home)
    _run([sys.executable, "-m", "megatron_lomdm.train", "--config", str(run_dir / "config.yaml")], hf_home)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 1 and record["kind"] == "train"
    out = _run([sys.executable, "-c", _FIRST_STEP_FROM_EXPORT, str(run_dir / "config.yaml"), str(tmp_path / "fresh"),
                str(tp1_export[0])], hf_home)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    assert ref["prompt_tokens"] > 0 and ref["response_tokens"] > 0  # the batch is conditioned
    assert record["num_tokens"] == ref["exported"]["num_tokens"] == ref["response_tokens"]
    for key in ("nelbo", "loss"):
        assert record[key] == pytest.approx(ref["exported"][key], rel=1e-6, abs=1e-9), key
        assert record[key] != pytest.approx(ref["fresh"][key], rel=1e-3), key  # the test can tell


def test_hf_reverse_exponents_match_native(tp1_run: Path, tp1_export: tuple[Path, dict]) -> None:
    """The export's features and reverse-head exponents equal the native DiffusionLM's."""
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMForMaskedDiffusion
    from megatron_lomdm.config import load_config

    cfg = load_config(tp1_run / "config.yaml")
    ckpt = hf_export.load_native_checkpoint(tp1_run)
    hf = LoMDMForMaskedDiffusion.from_pretrained(tp1_export[0]).eval()
    batch = hf_export.verification_batch(vocab_size=512, mask_id=3, pad_id=0, seq_length=32,
                                         seed=1)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    with hf_export.native_session(cfg.train.seed):
        model = hf_export.build_native_tp1(cfg, ckpt.state_dict)
        with torch.no_grad():
            _, hidden = model.backbone(ids, valid)
            rev_logits = model.rev_head(hidden, valid).view(1, *ids.shape)
            t_KB = torch.full((1, ids.shape[0]), 0.5)
            velocity = model.family.reverse_velocity(t_KB=t_KB, rev_logits_KBL=rev_logits,
                                                     valid_BL=valid)
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=batch["attention_mask"])
    assert hf.config.c1 == 0.7 and hf.config.c2 == 0.65
    torch.testing.assert_close(out.last_hidden_state, hidden)
    torch.testing.assert_close(out.reverse_exponents, velocity[0] * 0.5)
    assert float(out.reverse_exponents.std()) > 0  # the trained head is not constant


def test_hf_generate_matches_native_sampler(tp1_run: Path, tp1_export: tuple[Path, dict]) -> None:
    """``generate`` is the project's ancestral sampler: same seed, same tokens, same calls."""
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMForMaskedDiffusion
    from megatron_lomdm.config import load_config
    from megatron_lomdm.sampling.ancestral import AncestralSampler
    from megatron_lomdm.sampling.base import denoiser_from_backbone

    cfg = load_config(tp1_run / "config.yaml")
    ckpt = hf_export.load_native_checkpoint(tp1_run)
    hf = LoMDMForMaskedDiffusion.from_pretrained(tp1_export[0]).eval()
    with hf_export.native_session(cfg.train.seed):
        model = hf_export.build_native_tp1(cfg, ckpt.state_dict)
        denoise = denoiser_from_backbone(lambda z: model.backbone(z), family=model.family,
                                         rev_head=model.rev_head)
        for steps in (1, 10, 40):
            ref = AncestralSampler(mask_id=3, num_steps=steps, family=model.family).sample(
                denoise, batch_size=3, seq_length=32, generator=torch.Generator().manual_seed(3))
            got = hf.generate(num_samples=3, steps=steps, seed=3, return_dict=True)
            assert torch.equal(got["sequences"], ref.tokens_BL), steps
            assert got["num_calls"] == ref.num_calls, steps


_GENERATE_PROMPTED = r"""
import json, sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
spec = json.loads(sys.argv[2])
prefix = model.generate(input_ids=spec["prefixes"], num_samples=2, steps=10, seed=5, return_dict=True)
grid = torch.tensor(spec["grid"])
inplace = model.generate(prompt_ids=grid, given_mask=grid != spec["mask_id"], steps=10, seed=5,
                         return_dict=True)
print(json.dumps({"prefix": prefix["sequences"].tolist(), "prefix_given": prefix["given_mask"].tolist(),
                  "inplace": inplace["sequences"].tolist(), "inplace_calls": inplace["num_calls"]}))
"""


def test_hf_generate_with_prompt_matches_native(tp1_run: Path, tp1_export: tuple[Path, dict],
                                                tmp_path: Path, hf_home: Path) -> None:
    """Issue 19 §1: the export's ``generate`` takes a prompt (fresh process, ``trust_remote_code``):
    prefixes of any length (``input_ids``, each prompt ``num_samples`` times) and tokens given in
    place (``prompt_ids`` + ``given_mask``, Sudoku's layout). Given tokens are never changed, every
    other position gets a non-[MASK] token, and the samples equal the native ancestral sampler's for
    the same seed, with the reverse exponents normalised over the positions to generate
    (``given_BL``), as ``apps/generate.py`` wires it. The reverse head's output layer is scaled up
    (in the export and the native model alike) so that this normalisation visibly matters: 4 steps
    leave the learned order nearly flat."""
    from megatron_lomdm.apps.generate import prompt_batch
    from megatron_lomdm.config import load_config
    from megatron_lomdm.sampling.ancestral import AncestralSampler
    from megatron_lomdm.sampling.base import denoiser_from_backbone

    gen = torch.Generator().manual_seed(11)
    prefixes = [[1, *torch.randint(4, 512, (n,), generator=gen).tolist()] for n in (19, 11)]
    given = torch.rand(2, 32, generator=gen) < 0.5  # scattered givens, as a puzzle's cells
    grid = torch.where(given, torch.randint(4, 512, (2, 32), generator=gen), 3)
    spec = {"prefixes": prefixes, "grid": grid.tolist(), "mask_id": 3}
    export = Path(shutil.copytree(tp1_export[0], tmp_path / "sharp"))
    weights = load_file(str(export / "model.safetensors"))
    weights["reverse_head.out.3.weight"] *= 3000.0  # a sharp learned order
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    out = _run([sys.executable, "-c", _GENERATE_PROMPTED, str(export), json.dumps(spec)], hf_home)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    prefix_ids, inplace = torch.tensor(res["prefix"]), torch.tensor(res["inplace"])
    rows = [p for p in prefixes for _ in range(2)]  # num_samples=2 per prompt, consecutive
    prompt_BL, fixed_BL = prompt_batch(rows, 32, 3)
    assert prefix_ids.shape == (4, 32) and torch.equal(torch.tensor(res["prefix_given"]), fixed_BL)
    assert torch.equal(prefix_ids[fixed_BL], prompt_BL[fixed_BL])  # prompts unchanged
    assert torch.equal(inplace[given], grid[given])
    for ids in (prefix_ids, inplace):
        assert not bool((ids == 3).any()) and bool((ids >= 0).all() and (ids < 512).all())

    cfg = load_config(tp1_run / "config.yaml")
    full = hf_export.load_native_checkpoint(tp1_run).state_dict
    full["rev_head.out.3.weight"] = full["rev_head.out.3.weight"] * 3000.0
    with hf_export.native_session(cfg.train.seed):
        model = hf_export.build_native_tp1(cfg, full)
        sampler = AncestralSampler(mask_id=3, num_steps=10, family=model.family)

        def native(prompt: torch.Tensor, fixed: torch.Tensor, given_BL: torch.Tensor | None):
            denoise = denoiser_from_backbone(lambda z: model.backbone(z), family=model.family,
                                             rev_head=model.rev_head, given_BL=given_BL)
            return sampler.sample(denoise, prompt_BL=prompt, fixed_BL=fixed,
                                  generator=torch.Generator().manual_seed(5))

        assert torch.equal(prefix_ids, native(prompt_BL, fixed_BL, fixed_BL).tokens_BL)
        # the test can tell: normalising over every position (no given_BL) samples differently
        assert not torch.equal(prefix_ids, native(prompt_BL, fixed_BL, None).tokens_BL)
        ref = native(grid, given, given)
        assert torch.equal(inplace, ref.tokens_BL) and res["inplace_calls"] == ref.num_calls


def test_hf_generate_rejects_bad_prompts() -> None:
    """``generate``'s prompt arguments are checked before sampling (a fresh tiny model, no run)."""
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMConfig, LoMDMForMaskedDiffusion

    cfg = LoMDMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=8, family="lomdm", c1=0.7, c2=0.5, mask_id=3)
    model = LoMDMForMaskedDiffusion(cfg).eval()
    grid = torch.tensor([[5, 3, 7, 3, 3, 9, 3, 3]])
    for kwargs, message in [
        ({"input_ids": [[1] * 8]}, "prompt 0 has 8 tokens"),
        ({"input_ids": [[1, 2]], "prompt_ids": grid}, "not both"),
        ({"input_ids": [[1, 3]]}, r"\[MASK\] or outside the vocabulary"),
        ({"input_ids": [[1, 40]]}, "outside the vocabulary"),
        ({"prompt_ids": grid, "given_mask": grid == 3}, r"\[MASK\]"),
        ({"prompt_ids": grid, "given_mask": torch.ones(1, 7, dtype=torch.bool)}, "given_mask has shape"),
        ({"given_mask": grid != 3}, "given_mask needs prompt_ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(steps=2, seed=0, **kwargs)
    out = model.generate(input_ids=[[1, 2, 4], [5]], num_samples=3, steps=4, seed=0, return_dict=True)
    assert out["sequences"].shape == (6, 8) and out["given_mask"].sum(1).tolist() == [3, 3, 3, 1, 1, 1]
    assert out["sequences"][:3, :3].eq(torch.tensor([1, 2, 4])).all() and out["sequences"][3:, 0].eq(5).all()
    kept = model.generate(prompt_ids=grid, steps=4, seed=0)  # given_mask defaults to the non-[MASK] cells
    assert kept[grid != 3].tolist() == [5, 7, 9] and not bool((kept == 3).any())


@pytest.mark.parametrize("family", ["genmd4", "bd3lm", "multivariate"])
def test_export_other_families(family: str, tp1_run: Path, tmp_path: Path) -> None:
    """GenMD4 (token exponents), BD3LM (slot schedule) and multivariate (per-position order
    logits): verified export, and ``generate`` equals the native ancestral sampler. The weights
    are a fresh random init (no training)."""
    from megatron_lomdm.checkpoint.hf_modeling import LoMDMForMaskedDiffusion
    from megatron_lomdm.config import load_config, save_config
    from megatron_lomdm.config.load import replace
    from megatron_lomdm.sampling.ancestral import AncestralSampler
    from megatron_lomdm.sampling.base import denoiser_from_backbone

    run_dir = tmp_path / "run"
    cfg = replace(load_config(tp1_run / "config.yaml"), run={"dir": str(run_dir)},
                  diffusion={"name": family, "block_size": 8})
    save_config(cfg, run_dir / "config.yaml")
    folder = run_dir / "checkpoints" / "step_0000000"
    folder.mkdir(parents=True)
    with hf_export.native_session(cfg.train.seed):
        model = hf_export.build_native_tp1(cfg, None)
        if family == "genmd4":
            with torch.no_grad():
                model.family.raw_exponent_V.normal_(0.0, 1.0)
        if family == "multivariate":
            with torch.no_grad():
                model.family.order_logits_L.normal_(0.0, 3.0)
        shadow = {k: v.detach().float().clone() for k, v in model.named_parameters()}
        torch.save({"ema": {"decay": 0.0, "shadow": shadow}}, folder / "rank_000_000.pt")
        denoise = denoiser_from_backbone(lambda z: model.backbone(z), family=model.family)
        ref = AncestralSampler(mask_id=3, num_steps=9, family=model.family).sample(
            denoise, batch_size=3, seq_length=32, generator=torch.Generator().manual_seed(2))
    torch.save({"step": 0, "tp": 1, "pp": 1, "format": 1}, folder / "meta.pt")
    (run_dir / "checkpoints" / "latest").write_text(folder.name + "\n")

    result = hf_export.export_run(run_dir, tmp_path / "hf", verify=True)
    expected = {"logits", "last_hidden_state"}
    if family in ("genmd4", "multivariate"):
        expected.add("reverse_exponents")
    assert set(result.max_abs_diff) == expected
    assert max(result.max_abs_diff.values()) < 1e-5, result.max_abs_diff
    hf = LoMDMForMaskedDiffusion.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.family == family
    got = hf.generate(num_samples=3, steps=9, seed=2, return_dict=True)
    assert torch.equal(got["sequences"], ref.tokens_BL)
    assert got["num_calls"] == ref.num_calls


def test_failed_verification_publishes_nothing(tp1_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(export_dir: Path, batch: dict) -> dict:
        return {"logits": torch.zeros(3, 32, 512), "last_hidden_state": torch.zeros(3, 32, 64),
                "reverse_exponents": torch.zeros(3, 32)}

    monkeypatch.setattr(hf_export, "run_fresh_process", wrong)
    with pytest.raises(hf_export.ExportVerificationError, match="logits"):
        hf_export.export_run(tp1_run, tmp_path / "hf", verify=True)
    assert not os.listdir(tmp_path), "a failed export must leave nothing behind"


def test_adapter_trims_and_restores_vocab_padding() -> None:
    """Synthetic TP=2 x PP=2 shards with a padded vocabulary: merge, trim, split back."""
    V, Vp, D, F, layers = 500, 512, 8, 32, 4
    gen = torch.Generator().manual_seed(0)
    full = {"backbone.embedding.word_embeddings.weight": torch.randn(Vp, D, generator=gen),
            "backbone.output_layer.weight": torch.randn(Vp, D, generator=gen),
            "backbone.decoder.final_layernorm.weight": torch.randn(D, generator=gen),
            "backbone.decoder.final_layernorm.bias": torch.randn(D, generator=gen),
            "family.raw_exponent_V": torch.randn(V, generator=gen)}
    for i in range(layers):
        p = f"backbone.decoder.layers.{i}."
        full.update({p + "self_attention.linear_qkv.weight": torch.randn(3 * D, D, generator=gen),
                     p + "self_attention.linear_qkv.bias": torch.randn(3 * D, generator=gen),
                     p + "self_attention.linear_proj.weight": torch.randn(D, D, generator=gen),
                     p + "mlp.linear_fc2.weight": torch.randn(D, F, generator=gen),
                     p + "mlp.linear_fc1.layer_norm_weight": torch.randn(D, generator=gen)})
    shards = hf_export.split_native_state_dict(full, tp=2, pp=2)
    assert shards[(1, 1)]["backbone.output_layer.weight"].shape == (Vp // 2, D)
    assert "backbone.decoder.layers.1.mlp.linear_fc2.weight" in shards[(0, 1)]  # local numbering
    shards[(0, 0)]["backbone.embedding.word_embeddings._extra_state"] = None
    merged = hf_export.merge_native_shards(shards, tp=2, pp=2)
    canonical = {hf_export.canonical_native_key(k): v for k, v in full.items()}
    assert set(merged) == set(canonical)
    assert all(torch.equal(merged[k], canonical[k]) for k in merged)
    hf_sd = hf_export.native_to_hf(merged, vocab_size=V)
    assert hf_sd["lm_head.weight"].shape == (V, D) and hf_sd["token_exponent_raw"].shape == (V,)
    assert "model.layers.3.post_attention_layernorm.weight" in hf_sd
    back = hf_export.hf_to_native(hf_sd)
    template = {k: torch.empty_like(v) for k, v in shards[(1, 0)].items()}
    sliced = hf_export.slice_for_rank(template, back, tp_rank=1, tp=2, layer_numbers=[0, 1],
                                      vocab_size=V)
    emb = sliced["backbone.embedding.word_embeddings.weight"]
    ref_emb = canonical["backbone.embedding.word_embeddings.weight"]
    assert torch.equal(emb[: V - Vp // 2], ref_emb[Vp // 2: V])
    assert not bool(emb[V - Vp // 2:].any()), "padding rows are zero-filled"
    for key in ("backbone.decoder.layers.1.self_attention.linear_qkv.weight",
                "backbone.decoder.layers.0.mlp.linear_fc2.weight"):
        assert torch.equal(sliced[key], shards[(1, 0)][key])
    with pytest.raises(ValueError, match="differs between TP ranks"):
        bad = {k: dict(v) for k, v in shards.items()}
        bad[(1, 1)]["family.raw_exponent_V"] = bad[(1, 1)]["family.raw_exponent_V"] + 1
        hf_export.merge_native_shards(bad, tp=2, pp=2)


def test_export_no_ema_reads_dist_checkpoint(tp1_run: Path, tp1_export: tuple[Path, dict],
                                             tmp_path: Path) -> None:
    """--no-ema reads the live weights from the dist_checkpointing part (= EMA at decay 0)."""
    result = hf_export.export_run(tp1_run, tmp_path / "hf", ema=False)
    assert not result.ema
    ref = load_file(str(tp1_export[0] / "model.safetensors"))
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_export_sharded_safetensors(tp1_run: Path, tp1_export: tuple[Path, dict], tmp_path: Path,
                                    hf_home: Path) -> None:
    """max_shard_size (convert_to_hf --max-shard-size): several safetensors files plus the index, the
    same tensors, and transformers loads and verifies them in a fresh process."""
    result = hf_export.export_run(tp1_run, tmp_path / "hf", ema=False, verify=True, max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists() and result.max_abs_diff is not None
    got = {k: v for f in shards for k, v in load_file(str(f)).items()}
    ref = load_file(str(tp1_export[0] / "model.safetensors"))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import convert_to_hf
    finally:
        sys.path.remove(str(ROOT / "tools"))
    with pytest.raises(SystemExit):
        convert_to_hf.parse_args(["--run-dir", "x"])
    with pytest.raises(SystemExit):
        convert_to_hf.parse_args(["--run-dir", "x", "--output", "y", "--from-hf", "z"])
    assert convert_to_hf.main(["--run-dir", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_import_refuses_non_finite_weights(tp1_export: tuple[Path, dict], tiny_shards: Path,
                                           tmp_path: Path, hf_home: Path) -> None:
    """An export with inf/NaN weights is not imported: exit 2, one line naming the folder and tensor."""
    export = Path(shutil.copytree(tp1_export[0], tmp_path / "bad_export"))
    weights = load_file(str(export / "model.safetensors"))
    weights["lm_head.weight"][0, :3] = float("inf")
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    out = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--from-hf", str(export), "--to-run-dir",
                          str(tmp_path / "imported"), f"data.train={tiny_shards}"], cwd=ROOT, env=_env(hf_home),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert f"HF folder {export}: weight 'lm_head.weight' has 3 non-finite values" in line, line
    assert not (tmp_path / "imported" / "checkpoints").exists()
