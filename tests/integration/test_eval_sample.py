"""The evaluation and generation CLIs end to end: `tools/evaluate.py` and `tools/sample.py`.

Runs are trained once per module (tiny config, a few steps) and shared by the tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron_lomdm.data.loader import ShardLoader
from tests.helpers import zygote
from tests.helpers.runs import ROOT, clean_env, train

SAMPLERS = ("ancestral", "exact", "mdlm_cache", "top_prob", "top_margin", "lomdm_top_margin", "remask", "entropy_bound")
TRUE_VOCAB = 512  # the tiny tokenizer's model_vocab_size (tests/conftest.py)
MASK_ID = 3


def _cli(tool: str, *args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return zygote.run([*launcher, f"tools/{tool}", *map(str, args)], env=clean_env(), cwd=ROOT, timeout=timeout)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _trained(run_dir: Path, shards: Path, *overrides: str, nproc: int = 1) -> Path:
    out = train(run_dir, shards, *overrides, nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


# A LoMDM run whose forward and reverse schedulers disagree: a high LR, no warmup. (A high
# `optim.head_lr` would be the direct way, but checkpoints of such runs do not load yet: the
# optimizer's parameter groups do not match on resume.)
LOMDM = ("train.steps=4", "checkpoint.interval=2", "train.lr=0.02", "optim.warmup_steps=0", "optim.ema_decay=0.5")


@pytest.fixture(scope="module")
def lomdm_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trained(tmp_path_factory.mktemp("eval") / "lomdm", tiny_shards, *LOMDM)


@pytest.fixture(scope="module")
def poly_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoMDM with c1=1, c2=0: both schedulers are MDLM's alpha = 1 - t."""
    return _trained(tmp_path_factory.mktemp("eval") / "c2zero", tiny_shards, "train.steps=2",
                    "diffusion.c1=1.0", "diffusion.c2=0.0", "checkpoint.interval=0")


@pytest.fixture(scope="module")
def arm_judge(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ARM run (EMA = live weights) that has learnt at least the unigram statistics."""
    return _trained(tmp_path_factory.mktemp("eval") / "arm", tiny_shards, "diffusion.name=arm", "train.steps=30",
                    "optim.ema_decay=0.0", "checkpoint.interval=0")


# --------------------------------------------------------------------------------------------
# evaluate.py
# --------------------------------------------------------------------------------------------

_MDLM_REFERENCE = textwrap.dedent("""
    # The MDLM NELBO by hand, with the evaluation's own times and masks: -(1/t) log p(x_i | z_t)
    # over masked valid positions, averaged over the two corruptions, per valid token.
    import json, sys, math
    import numpy as np, torch
    from megatron_lomdm.data.loader import ShardLoader
    from megatron_lomdm.diffusion.noise import mask_uniforms, time_uniforms
    from megatron_lomdm.diffusion.time_sampling import low_discrepancy_t
    from megatron_lomdm.apps.evaluate import EVAL_NOISE_STEP, evaluate_run
    from megatron_lomdm.apps.run import open_run, weights

    run = open_run(sys.argv[1])
    N, D = 24, 2
    res = evaluate_run(run, t_draws=D, max_sequences=N, hash_checkpoint=False)
    cfg, model = run.cfg, run.model
    L, V, mask_id, seed = cfg.model.seq_length, model.backbone.true_vocab_size, cfg.model.mask_id, cfg.train.seed
    reader = ShardLoader(run.valid_path, split=run.valid_split, micro_batch_size=1, global_batch_size=1,
                         dp_rank=0, dp_size=1, seed=0, shuffle=False, drop_last=False, num_epochs=1)
    tokens, lengths = reader.read_samples(np.arange(N))
    x = torch.from_numpy(tokens)
    valid = torch.arange(L)[None, :] < torch.from_numpy(lengths)[:, None]
    total = 0.0
    with torch.no_grad(), weights(run, True):
        for d in range(D):
            j = torch.arange(N, dtype=torch.int64) + d * N
            t = low_discrepancy_t(time_uniforms(seed=seed, step=EVAL_NOISE_STEP, index_B=j), j, N * D,
                                  eps=cfg.diffusion.eps_t)
            u = mask_uniforms(seed=seed, step=EVAL_NOISE_STEP, index_B=j, num_corruptions=2, seq_length=L)
            for k in range(2):
                m = (u[k] < torch.exp(torch.log(t))[:, None]) & valid
                z = torch.where(m, mask_id, x)
                logits = model.backbone(z, valid)[0][..., :V].double()
                logits[..., mask_id] = -math.inf
                logp = torch.log_softmax(logits, -1).gather(-1, x[..., None])[..., 0]
                total += float(torch.where(m, -logp / t.double()[:, None], 0.0).sum()) / 2
    ref = total / (int(valid.sum()) * D)
    print(json.dumps({"nelbo": res.nelbo, "main": res.main, "velocity": res.velocity, "ref": ref}))
""")


_COND_REFERENCE = (
    _MDLM_REFERENCE.replace("tokens, lengths = reader.read_samples(np.arange(N))",
                            "tokens, lengths, cond = reader.read_rows(np.arange(N))")
    .replace("valid = torch.arange(L)[None, :] < torch.from_numpy(lengths)[:, None]",
             "valid = torch.arange(L)[None, :] < torch.from_numpy(lengths)[:, None]\n"
             "free = valid & ~torch.from_numpy(cond)")
    .replace("m = (u[k] < torch.exp(torch.log(t))[:, None]) & valid", "m = (u[k] < torch.exp(torch.log(t))[:, None]) & free")
    .replace("ref = total / (int(valid.sum()) * D)", "ref = total / (int(free.sum()) * D)")
    .replace('"ref": ref}', '"ref": ref, "num_tokens": res.num_tokens, "free": int(free.sum()), '
             '"valid_tokens": int(valid.sum())}')
)


def test_eval_conditioned_nelbo_is_the_responses(tiny_cond_shards: Path, tmp_path: Path) -> None:
    """On conditioned shards (issue 19 §1) the evaluation's NELBO is the MDLM NELBO by hand over the
    free (response) positions only, per response token: prompts are never masked nor counted."""
    run = _trained(tmp_path / "cond", tiny_cond_shards, "train.steps=2", "diffusion.c1=1.0", "diffusion.c2=0.0",
                   "checkpoint.interval=0")
    script = tmp_path / "cond_reference.py"
    script.write_text(_COND_REFERENCE)
    out = subprocess.run([sys.executable, str(script), str(run)], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    ref = _json(out)
    assert ref["num_tokens"] == ref["free"] < ref["valid_tokens"]
    assert ref["nelbo"] == pytest.approx(ref["ref"], rel=1e-5)


def test_eval_velocity_included(lomdm_run: Path, poly_run: Path, tmp_path: Path) -> None:
    # schedulers that disagree: the reported NELBO is main + velocity, velocity > 0
    got = _json(_cli("evaluate.py", "--run-dir", lomdm_run, "--no-ema", "--no-hash"))
    assert got["velocity"] > 1e-7, got
    assert got["nelbo"] == pytest.approx(got["main"] + got["velocity"], rel=1e-6)  # fp32 sums
    assert got["nelbo"] >= got["main"]
    assert got["fingerprint"]["weights"] == "live" and got["fingerprint"]["protocol"]["velocity_term"] is True

    # c2 = 0: the velocity term vanishes exactly and the number is the MDLM NELBO
    script = tmp_path / "mdlm_reference.py"
    script.write_text(_MDLM_REFERENCE)
    out = subprocess.run([sys.executable, str(script), str(poly_run)], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    ref = _json(out)
    assert ref["velocity"] == 0.0
    assert ref["nelbo"] == pytest.approx(ref["main"], rel=1e-6)  # fp32 sums of the same terms
    assert ref["nelbo"] == pytest.approx(ref["ref"], rel=1e-5)


def test_evaluate_cli_json(lomdm_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    config_before = (lomdm_run / "config.yaml").read_bytes()
    metrics_before = (lomdm_run / "metrics.jsonl").read_bytes()
    out_file = tmp_path / "eval.json"
    got = _json(_cli("evaluate.py", "--run-dir", lomdm_run, "--t-draws", "2", "--out", out_file))
    for key in ("nelbo", "ppl", "num_tokens", "fingerprint", "main", "velocity"):
        assert key in got, key
    assert got["ppl"] == pytest.approx(math.exp(got["nelbo"]), rel=1e-12)
    assert got["nelbo"] == pytest.approx(got["main"] + got["velocity"], rel=1e-6)  # fp32 sums and got["velocity"] >= 0
    assert json.loads(out_file.read_text()) == got

    from megatron_lomdm.data.shards import read_manifest
    from megatron_lomdm.apps.fingerprint import checkpoint_fingerprint

    manifest = read_manifest(tiny_shards)
    assert got["num_tokens"] == manifest["splits"]["valid"]["num_tokens"]  # the whole split, pads excluded
    fp = got["fingerprint"]
    assert fp["checkpoint"]["step"] == 4
    assert fp["checkpoint"]["sha256"] == checkpoint_fingerprint(lomdm_run / "checkpoints" / "step_0000004")["sha256"]
    assert fp["data"]["fingerprint"] == manifest.fingerprint("valid") and fp["data"]["split"] == "valid"
    assert fp["protocol"]["t_draws"] == 2 and fp["protocol"]["seed"] == 1234
    assert fp["weights"] == "ema" and fp["precision"] == "fp32"
    assert fp["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1, "backend": "megatron", "device": "cpu"}

    # an earlier checkpoint; another micro-batch size gives the same number (noise is per row)
    older = _json(_cli("evaluate.py", "--run-dir", lomdm_run, "--t-draws", "2", "--checkpoint", "2",
                       "--micro-batch-size", "3"))
    assert older["fingerprint"]["checkpoint"]["step"] == 2
    assert older["fingerprint"]["checkpoint"]["sha256"] != fp["checkpoint"]["sha256"]
    assert older["nelbo"] != got["nelbo"]
    again = _json(_cli("evaluate.py", "--run-dir", lomdm_run, "--t-draws", "2", "--micro-batch-size", "3",
                       "--no-hash"))
    assert again["nelbo"] == pytest.approx(got["nelbo"], rel=1e-6)  # fp32 per-micro-batch sums
    # the training statistic: mean within-sequence correlation, independent of the micro-batching
    assert -1.0 <= got["velocity_confidence_corr"] <= 1.0 and "order_grad_snr" not in got
    assert again["velocity_confidence_corr"] == pytest.approx(got["velocity_confidence_corr"], rel=1e-9)

    # read-only: the run directory is untouched
    assert (lomdm_run / "config.yaml").read_bytes() == config_before
    assert (lomdm_run / "metrics.jsonl").read_bytes() == metrics_before

    missing = _cli("evaluate.py", "--run-dir", lomdm_run, "--checkpoint", "3")
    assert missing.returncode == 2 and "no checkpoint at step 3" in missing.stderr


# --------------------------------------------------------------------------------------------
# sample.py
# --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sample_cli(lomdm_run: Path, arm_judge: Path, tmp_path: Path) -> None:
    for name in SAMPLERS:
        out = tmp_path / f"{name}.jsonl"
        extra = ["--prefix", "The"] if name == "top_prob" else []
        summary = _json(_cli("sample.py", "--run-dir", lomdm_run, "--sampler", name, "--steps", "32",
                             "--num-samples", "3", "--batch-size", "2", "--out", out, "--no-hash", *extra))
        lines = _read_jsonl(out)
        assert len(lines) == 3 and summary["num_samples"] == 3
        assert summary["num_calls"] == sum(summary["num_calls_per_batch"]) >= 2
        for line in lines:
            ids = line["token_ids"]
            assert len(ids) == 32 and MASK_ID not in ids and all(0 <= i < TRUE_VOCAB for i in ids), (name, ids)
            assert 1 <= line["num_calls"] <= 32 and isinstance(line["text"], str)
            sampler = line["fingerprint"]["sampler"]
            assert sampler["name"] == name and sampler["steps"] == 32 and sampler["temperature"] == 1.0
            assert line["fingerprint"]["generation"]["seed"] == 1234
            assert line["fingerprint"]["checkpoint"]["step"] == 4
        assert out.with_suffix(".summary.json").exists()
        # learned order: a per-position mean exponent in (c1 - c2, c1 + c2) wherever positions were masked
        exps = [e for e in summary["per_position_mean_exponent"] if e is not None]
        assert exps and all(0.05 < e < 1.35 for e in exps), (name, exps)
        if extra:
            prefix = lines[0]["fingerprint"]["generation"]["prefix_ids"]
            assert prefix and all(line["token_ids"][: len(prefix)] == prefix for line in lines)
            assert all(line["text"].lstrip().startswith("The") for line in lines)
    assert (tmp_path / "ancestral.order.png").stat().st_size > 0

    # an ARM model sampled with enough steps unmasks left to right: Kendall tau = 1
    arm = _json(_cli("sample.py", "--run-dir", arm_judge, "--sampler", "ancestral", "--steps", "32",
                     "--num-samples", "2", "--out", tmp_path / "arm.jsonl", "--no-hash"))
    assert arm["kendall_tau_mean"] == pytest.approx(1.0)
    assert all(e is None for e in arm["per_position_mean_exponent"])


@pytest.mark.slow
def test_sample_tp2(lomdm_run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    # checkpoints load only under the layout that wrote them, so the TP=2 side is the same run
    # trained under TP=2 (training is layout-independent)
    tp2_run = _trained(tmp_path / "tp2", tiny_shards, *LOMDM, "parallel.tp=2", nproc=2)
    args = ("--sampler", "ancestral", "--steps", "16", "--num-samples", "4", "--batch-size", "2", "--seed", "7",
            "--no-hash")
    one = _json(_cli("sample.py", "--run-dir", lomdm_run, *args, "--out", tmp_path / "tp1.jsonl"))
    two = _json(_cli("sample.py", "--run-dir", tp2_run, *args, "--out", tmp_path / "tp2.jsonl", nproc=2))
    ref, got = _read_jsonl(tmp_path / "tp1.jsonl"), _read_jsonl(tmp_path / "tp2.jsonl")
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in ref]
    assert two["num_calls_per_batch"] == one["num_calls_per_batch"]
    assert got[0]["fingerprint"]["layout"]["tp"] == 2 and ref[0]["fingerprint"]["layout"]["tp"] == 1


def test_genppl_judge_roundtrip(lomdm_run: Path, arm_judge: Path, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "judged.jsonl"
    summary = _json(_cli("sample.py", "--run-dir", lomdm_run, "--sampler", "ancestral", "--steps", "16",
                         "--num-samples", "4", "--out", out, "--judge", arm_judge, "--no-hash"))
    assert math.isfinite(summary["gen_ppl"]) and summary["gen_ppl"] > 1.0
    assert summary["scored_tokens"] == 4 * 32
    assert summary["judge"]["kind"] == "run" and summary["judge"]["retokenized"] is False
    assert summary["unigram_entropy_mean"] > 0

    # the judge prefers its own training data to uniform-random token sequences
    import numpy as np

    from megatron_lomdm.data.loader import ShardLoader

    reader = ShardLoader(tiny_shards, split="train", micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                         seed=0, shuffle=False, drop_last=False, num_epochs=1)
    tokens, lengths = reader.read_samples(np.arange(24))
    rng = np.random.default_rng(0)
    rows = [{"token_ids": t[:n].tolist()} for t, n in zip(tokens, lengths)]
    rows += [{"token_ids": rng.integers(4, TRUE_VOCAB, 32).tolist()} for _ in range(24)]
    rows += [{"text": "def main():\n    return 0\n", "tokenizer_sha256": "another tokenizer"}]
    src, dst = tmp_path / "score.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("evaluate.py", "--run-dir", arm_judge, "--score-jsonl", src, "--score-out", dst)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = _read_jsonl(dst)
    assert len(scored) == len(rows)

    def ppl(part: list[dict]) -> float:
        return math.exp(-sum(sum(r["logprobs"]) for r in part) / sum(r["num_tokens"] for r in part))

    own, uniform = ppl(scored[:24]), ppl(scored[24:48])
    assert own < uniform, (own, uniform)
    assert scored[-1]["retokenized"] is True and scored[-1]["num_tokens"] > 0
    assert all(math.isfinite(x) and x <= 0 for r in scored for x in r["logprobs"])

    # the exact AR likelihood of an ARM run's eval set, next to its NELBO
    got = _json(_cli("evaluate.py", "--run-dir", arm_judge, "--exact-ar", "--max-sequences", "8", "--no-hash"))
    assert got["exact_ar"]["num_tokens"] == got["num_tokens"] and math.isfinite(got["exact_ar"]["nll"])
    assert got["velocity"] == 0.0


def test_hf_judge_folder(tiny_tokenizer: Path, tmp_path: Path) -> None:
    """A local HF causal-LM folder as judge: re-tokenised text, one log-prob per token."""
    transformers = pytest.importorskip("transformers")
    from megatron_lomdm.apps.judges import HFJudge, judge_gen_ppl, make_judge

    folder = tmp_path / "hf_judge"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer / "tokenizer.json"))
    tok.save_pretrained(folder)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=TRUE_VOCAB, n_positions=16, n_embd=16,
                                                         n_layer=1, n_head=2)).save_pretrained(folder)
    judge = make_judge(folder)
    assert isinstance(judge, HFJudge)
    text = "import os\nprint(os.getcwd())\n" * 3  # longer than the 16-token context: windows
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    rows = judge.logprobs([{"text": text}])
    assert len(rows[0]) == n - 1 and all(x <= 0 for x in rows[0])  # no BOS: the first token is context
    res = judge_gen_ppl(judge, [{"text": text}, {"text": "hello"}])
    assert math.isfinite(res["gen_ppl"]) and res["judge"]["kind"] == "hf"


def test_sample_cli_prompts(tiny_cond_shards: Path, tmp_path: Path) -> None:
    """`--prompts FILE.jsonl` (issue 19 §1): every sampler keeps each prompt ([BOS] + its ids, as
    the preprocessing tokenizes it) verbatim in front of its samples; bad prompt files are refused."""
    run = _trained(tmp_path / "cond", tiny_cond_shards, "train.steps=2", "checkpoint.interval=0")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("The module", "Return the", "A")))
    for name in SAMPLERS:
        out = tmp_path / f"{name}.jsonl"
        summary = _json(_cli("sample.py", "--run-dir", run, "--sampler", name, "--steps", "32", "--num-samples", "2",
                             "--prompts", prompts, "--prompt-key", "question", "--out", out, "--no-hash"))
        lines = _read_jsonl(out)
        assert summary["num_samples"] == len(lines) == 6
        assert [line["prompt"] for line in lines] == ["The module"] * 2 + ["Return the"] * 2 + ["A"] * 2
        for line in lines:
            ids, prompt = line["token_ids"], line["prompt_ids"]
            assert len(prompt) >= 2 and ids[: len(prompt)] == prompt, (name, line)
            assert MASK_ID not in ids
    # the run's conditioned validation rows: their given tokens are the prompts
    out = tmp_path / "valid.jsonl"
    _json(_cli("sample.py", "--run-dir", run, "--sampler", "ancestral", "--steps", "8", "--num-samples", "1",
               "--prompts", "valid", "--max-prompts", "2", "--out", out, "--no-hash"))
    reader = ShardLoader(tiny_cond_shards, split="valid", micro_batch_size=1, global_batch_size=1, dp_rank=0,
                         dp_size=1, seed=0, shuffle=False)
    tokens, _, cond = reader.read_rows(np.arange(reader.num_samples))
    want = [row[given].tolist() for row, given in zip(tokens, cond) if given.any()][:2]
    lines = _read_jsonl(out)
    assert [line["prompt_ids"] for line in lines] == want
    assert all(line["token_ids"][: len(p)] == p for line, p in zip(lines, want))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"other": 1}\n')
    refused = _cli("sample.py", "--run-dir", run, "--sampler", "ancestral", "--steps", "4", "--num-samples", "1",
                   "--prompts", bad, "--prompt-key", "question", "--no-hash")
    assert refused.returncode == 2 and f"{bad}:2: no string field 'question'" in refused.stderr
