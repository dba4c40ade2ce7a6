"""The config system: strict keys, typed values, inheritance, precedence, invariants, round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_lomdm.config import Config, dump_config, load_config, save_config, validate_for_world
from megatron_lomdm.config.load import config_from_dict, parse_dotlist

ROOT = Path(__file__).resolve().parents[2]
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
INTERFACE_KEYS = [
    "run.dir", "train.steps", "train.seed", "train.micro_batch_size", "train.global_batch_size",
    "train.lr", "diffusion.name", "diffusion.c1", "diffusion.c2", "diffusion.block_size",
    "model.num_layers", "model.hidden_size", "model.num_heads", "model.seq_length", "parallel.tp",
    "parallel.pp", "parallel.backend", "parallel.zero", "data.train", "data.valid", "tracking.uri",
    "checkpoint.interval",
]


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_experiments_exist() -> None:
    names = {p.stem for p in EXPERIMENTS}
    assert {"demo_cpu", "tiny_cpu", "owt_1b", "owt_small", "lm1b_small", "lm1b_packed_small"} <= names


def test_owt_1b_shape_and_layout() -> None:
    cfg = load_config(ROOT / "configs/experiments/owt_1b.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (24, 2048, 16)
    assert cfg.model.seq_length == 1024
    assert validate_for_world(cfg, 8) == 8  # TP=1 x DP=8 on one 8-GPU node (docs/scaling.md)
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * 8) == 0


def test_interface_keys_exist() -> None:
    data = yaml.safe_load(dump_config(Config()))
    for dotted in INTERFACE_KEYS:
        node = data
        for part in dotted.split("."):
            assert part in node, f"interface.md key {dotted} missing from the schema"
            node = node[part]


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'train\.step'; did you mean 'train\.steps'"):
        load_config(ROOT / "configs/experiments/tiny_cpu.yaml", ["train.step=3"])
    with pytest.raises(ValueError, match=r"unknown key 'modle'"):
        config_from_dict({"modle": {"num_layers": 2}})


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 64\n")
    with pytest.raises(ValueError, match=r"model\.hidden_sise.*model\.hidden_size"):
        load_config(bad)


def test_type_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"train\.steps: expected int"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match=r"train\.deterministic: expected bool"):
        load_config(None, ["train.deterministic=3"])
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # int accepted for float


@pytest.mark.parametrize(
    "override, field",
    [
        (["diffusion.c1=0.5", "diffusion.c2=0.6"], "diffusion.c1"),
        (["diffusion.name=nope"], "diffusion.name"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
        (["model.num_heads=5", "model.hidden_size=64"], "model.num_heads"),
        (["parallel.backend=megatron", "parallel.zero=2"], "parallel.zero"),
        (["parallel.backend=deepspeed", "parallel.zero=3", "parallel.pp=2"], "parallel.pp"),
        (["parallel.tp=5"], "parallel.tp"),
        (["train.precision=fp8"], "train.precision"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["diffusion.name=bd3lm", "diffusion.block_size=5", "model.seq_length=32"], "diffusion.block_size"),
    ],
)
def test_invariant_violation_names_field(override: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, override)


def test_world_size_checks() -> None:
    cfg = load_config(None, ["parallel.tp=2", "train.micro_batch_size=4", "train.global_batch_size=8"])
    with pytest.raises(ValueError, match=r"parallel\.tp.*does not divide the world size 3"):
        validate_for_world(cfg, 3)
    assert validate_for_world(cfg, 4) == 2
    with pytest.raises(ValueError, match=r"train\.global_batch_size"):
        validate_for_world(cfg, 8)  # DP=4: 4 x 4 = 16 does not divide 8


def test_defaults_inheritance_and_precedence(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.yaml").write_text("model:\n  num_layers: 3\n  hidden_size: 96\n  num_heads: 4\n")
    (tmp_path / "base.yaml").write_text("defaults: [model/m]\ntrain:\n  steps: 7\n  lr: 0.5\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base.yaml]\nmodel:\n  num_layers: 5\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.steps=11"])
    assert cfg.model.num_layers == 5  # child file beats its defaults
    assert cfg.model.hidden_size == 96  # inherited through two levels
    assert cfg.train.lr == 0.5
    assert cfg.train.steps == 11  # CLI beats YAML
    assert cfg.train.seed == Config().train.seed  # schema default where nobody set it


def test_defaults_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dotlist_parsing() -> None:
    assert parse_dotlist(["a.b=1", "a.c=x", "d=true", "e=1e-3"]) == {"a": {"b": 1, "c": "x"}, "d": True, "e": 1e-3}
    with pytest.raises(ValueError, match="dotted.key=value"):
        parse_dotlist(["train.steps"])


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_resolved_config_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_print_config_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/tiny_cpu.yaml",
         "--print-config", "train.steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["steps"] == 3
    assert config_from_dict(printed) == load_config(ROOT / "configs/experiments/tiny_cpu.yaml", ["train.steps=3"])


def test_cli_bad_override_exits_with_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/tiny_cpu.yaml",
         "--print-config", "trian.steps=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "unknown key 'trian'" in out.stderr and "did you mean 'train'" in out.stderr


def test_num_corruptions_key() -> None:
    """diffusion.num_corruptions: K >= 2 for learned forward schedules, ignored by context-free ones."""
    assert load_config(None).diffusion.num_corruptions == 2
    assert load_config(None, ["diffusion.num_corruptions=4"]).diffusion.num_corruptions == 4
    for name in ("lomdm", "genmd4", "multivariate"):
        with pytest.raises(ValueError, match=r"diffusion\.num_corruptions.*K >= 2"):
            load_config(None, [f"diffusion.name={name}", "diffusion.num_corruptions=1"])
    for name in ("mdlm", "poly", "arm", "bd3lm"):  # ignored (K = 1): a shared config may switch families
        load_config(None, [f"diffusion.name={name}", "diffusion.c2=0.0", "diffusion.num_corruptions=4"])
    # a frozen multivariate schedule is context-free as well
    load_config(None, ["diffusion.name=multivariate", "diffusion.learn_order=false", "diffusion.num_corruptions=1"])
    with pytest.raises(ValueError, match=r"diffusion\.num_corruptions: must be >= 1"):
        load_config(None, ["diffusion.name=mdlm", "diffusion.num_corruptions=0"])
    with pytest.raises(ValueError, match=r"diffusion\.num_corruptions: expected int"):
        load_config(None, ["diffusion.num_corruptions=2.5"])


def test_multivariate_keys() -> None:
    cfg = load_config(ROOT / "configs/diffusion/multivariate.yaml")
    d = cfg.diffusion
    assert (d.name, d.learn_order, d.order_logits, d.num_corruptions) == ("multivariate", True, [], 2)
    cfg = load_config(None, ["diffusion.name=multivariate", "model.seq_length=4", "diffusion.learn_order=false",
                             "diffusion.order_logits=[6, 6, -6, -6]"])
    assert cfg.diffusion.order_logits == [6.0, 6.0, -6.0, -6.0] and not cfg.diffusion.learn_order
    with pytest.raises(ValueError, match=r"diffusion\.c1.*multivariate needs diffusion\.c1 > diffusion\.c2 >= 0"):
        load_config(None, ["diffusion.name=multivariate", "diffusion.c1=0.5", "diffusion.c2=0.6"])
    with pytest.raises(ValueError, match=r"diffusion\.order_logits: has 3 values.*model\.seq_length=4"):
        load_config(None, ["diffusion.name=multivariate", "model.seq_length=4", "diffusion.order_logits=[1, 2, 3]"])
    with pytest.raises(ValueError, match=r"diffusion\.order_logits\[1\]: expected a finite number"):
        load_config(None, ["diffusion.name=multivariate", "diffusion.order_logits=[1, x]"])
    with pytest.raises(ValueError, match=r"diffusion\.order_logits: expected a list"):
        load_config(None, ["diffusion.name=multivariate", "diffusion.order_logits=3"])
    with pytest.raises(ValueError, match=r"diffusion\.learn_order: only the multivariate family"):
        load_config(None, ["diffusion.name=lomdm", "diffusion.learn_order=false"])
    with pytest.raises(ValueError, match=r"diffusion\.order_logits: only the multivariate family"):
        load_config(None, ["diffusion.name=poly", "diffusion.c2=0", "diffusion.order_logits=[1.0]"])
    with pytest.raises(ValueError, match=r"diffusion\.learn_order: expected bool"):
        load_config(None, ["diffusion.name=multivariate", "diffusion.learn_order=3"])


@pytest.mark.parametrize("override, key, shown", [
    ("train.lr=inf", "train.lr", "inf"),
    ("train.lr=nan", "train.lr", "nan"),
    ("train.lr=.inf", "train.lr", "inf"),
    ("optim.beta1=-inf", "optim.beta1", "-inf"),
    ("diffusion.c1=.nan", "diffusion.c1", "nan"),
    ("model.dropout=1e999", "model.dropout", "inf"),
])
def test_non_finite_numbers_are_rejected_naming_the_key(override: str, key: str, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"^config: {key.replace('.', r'[.]')}: must be a finite number, got {shown}$"):
        load_config(ROOT / "configs/experiments/tiny_cpu.yaml", [override])


def test_non_finite_numbers_in_yaml_and_lists_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  head_lr: .inf\n")
    with pytest.raises(ValueError, match=r"config: optim\.head_lr: must be a finite number, got inf"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"config: diffusion\.order_logits\[1\]: must be a finite number, got nan"):
        load_config(None, ["diffusion.name=multivariate", "model.seq_length=2", "diffusion.order_logits=[1, .nan]"])
    with pytest.raises(ValueError, match=r"config: data\.train\[0\]\.weight: must be a finite number, got inf"):
        config_from_dict({"data": {"train": [{"source": "a", "weight": float("inf")}]}})


def test_cli_non_finite_override_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "megatron_lomdm.train", "--config", "configs/experiments/tiny_cpu.yaml",
         "--print-config", "train.lr=inf"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "lomdm-train: config: train.lr: must be a finite number, got inf"


@pytest.mark.parametrize(
    "override, message",
    [
        (["parallel.sequence_parallel=true"], r"parallel\.sequence_parallel: needs parallel\.tp > 1"),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.backend=deepspeed"],
         r"parallel\.sequence_parallel: is wired for parallel\.backend=megatron only"),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_length=33"],
         r"parallel\.sequence_parallel: model\.seq_length=33 is not divisible by parallel\.tp=2"),
        (["parallel.virtual_stages=2"], r"parallel\.virtual_stages: 2 needs parallel\.pp > 1"),
        (["parallel.virtual_stages=0"], r"parallel\.virtual_stages: must be >= 1"),
        (["parallel.pp=2", "parallel.virtual_stages=2", "parallel.backend=deepspeed"],
         r"parallel\.virtual_stages: interleaved pipeline stages need parallel\.backend=megatron"),
        (["model.num_layers=12", "parallel.pp=2", "parallel.virtual_stages=4"],
         r"parallel\.virtual_stages: parallel\.pp x parallel\.virtual_stages = 2 x 4 = 8 does not divide "
         r"model\.num_layers=12"),
        (["model.init_device=gpu"], r"model\.init_device: must be one of auto, cpu, cuda, meta"),
        (["model.init_device=meta"], r"model\.init_device: meta is not supported: megatron-core builds on the meta"),
    ],
)
def test_scale_feature_rejections(override: list[str], message: str) -> None:
    """Sequence parallelism, interleaved stages and init devices: unsupported combinations are refused
    up front, naming the key."""
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_interleaved_schedule_needs_micro_batches_multiple_of_pp() -> None:
    cfg = load_config(None, ["model.num_layers=4", "parallel.pp=2", "parallel.virtual_stages=2",
                             "train.micro_batch_size=4", "train.global_batch_size=12"])
    with pytest.raises(ValueError, match=r"parallel\.virtual_stages: megatron's interleaved schedule needs the "
                                         r"micro-batches per step \(3 = .*multiple of parallel\.pp=2"):
        validate_for_world(cfg, 2)
    cfg = load_config(None, ["model.num_layers=4", "parallel.pp=2", "parallel.virtual_stages=2",
                             "train.micro_batch_size=4", "train.global_batch_size=16"])
    assert validate_for_world(cfg, 2) == 1  # 4 micro-batches
    cfg = load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true"])
    assert cfg.parallel.sequence_parallel
