"""Shard sources (pipe:, http(s)://, file://, brace patterns), failures, the HF datasets input
adapter (local Parquet / Arrow), and the docs/recipes.md commands on the bundled corpus.

Everything is local: an ``http.server`` on 127.0.0.1 started by the tests, ``cat`` behind
``pipe:``, Parquet files written here. No hub access.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_lomdm.data.demo_corpus import write_demo_corpus
from megatron_lomdm.data.loader import ShardLoader
from megatron_lomdm.data.shards import read_manifest, read_split, write_shards
from megatron_lomdm.data.sources import (
    ShardUnavailableError,
    SourceOptions,
    open_source,
    parse_spec,
)
from megatron_lomdm.data.tokenize import DETOKENIZERS, load_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
G, SEED = 16, 77


def _tool(name: str):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Packed length-16 shards (about a dozen small shards, with a valid split)."""
    root = tmp_path_factory.mktemp("sources")
    write_demo_corpus(root / "text", max_bytes=40_000)
    train_bpe_tokenizer([root / "text"], root / "tok", vocab_size=400)
    write_shards(
        [root / "text"],
        root / "serve" / "shards",
        tokenizer=root / "tok",
        seq_length=16,
        layout="packed",
        shard_size_mb=0.01,
        valid_fraction=0.1,
        workers=0,
        progress=False,
    )
    return {
        "root": root,
        "shards": root / "serve" / "shards",
        "tok": root / "tok",
        "text": root / "text",
    }


class _Handler(http.server.SimpleHTTPRequestHandler):
    fail: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if any(self.path.endswith(name) for name in self.fail):
            self.send_error(500, "simulated server error")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(data: dict[str, Path]) -> Iterator[tuple[str, type[_Handler]]]:
    """An HTTP server on 127.0.0.1 serving ``data['root'] / 'serve'``."""
    handler = type("Handler", (_Handler,), {"fail": set()})
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(data["root"] / "serve"))
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def _pattern(manifest_split: list[dict], head: str, tail: str = "") -> str:
    n = len(manifest_split)
    return f"{head}train-{{000000..{n - 1:06d}}}.tar{tail}"


def _loader(
    spec: object, tmp: Path, *, mbs: int, dp_rank: int = 0, dp: int = 1, **opts: object
) -> ShardLoader:
    options = SourceOptions(cache_dir=tmp, retry_wait_s=0.01, **opts)  # type: ignore[arg-type]
    return ShardLoader(
        spec,
        micro_batch_size=mbs,
        global_batch_size=G,
        dp_rank=dp_rank,
        dp_size=dp,
        seed=SEED,
        source_options=options,
    )


def _step(loader: ShardLoader) -> tuple[torch.Tensor, torch.Tensor]:
    micro = loader.next_global_batch()
    return torch.cat([m["tokens"] for m in micro]), torch.cat([m["valid"] for m in micro])


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_pipe_and_http_sources(
    data: dict[str, Path], server: tuple[str, type], tmp_path: Path
) -> None:
    """pipe:cat / http.server / file:// / brace patterns give exactly the local folder's batches
    under DP=2, across an epoch boundary, and after a resume (also across kinds and layouts)."""
    url, _ = server
    shards = data["shards"]
    entries = read_manifest(shards).split("train")["shards"]
    specs = {
        "pipe-pattern": _pattern(entries, f"pipe:cat {shards}/"),
        "pipe-manifest": f"pipe:cat {shards}/manifest.json",
        "http-pattern": _pattern(entries, f"{url}/shards/"),
        "http-folder": f"{url}/shards/",
        "http-manifest": f"{url}/shards/manifest.json",
        "file": f"file://{shards}",
        "local-pattern": _pattern(entries, f"{shards}/"),
    }
    reference = _loader(shards, tmp_path / "ref", mbs=4)
    steps = reference.batches_per_epoch + 2  # crosses an epoch boundary
    expected = [_step(reference) for _ in range(steps)]
    for kind, spec in specs.items():
        ranks = [_loader(spec, tmp_path / kind, mbs=2, dp_rank=r, dp=2) for r in range(2)]
        assert ranks[0].fingerprint == reference.fingerprint, kind  # locations are not data
        assert ranks[0].split == "train"
        assert ranks[0].source.remote == (kind.split("-")[0] in ("pipe", "http"))
        for want_tokens, want_valid in expected:
            got = [_step(r) for r in ranks]
            assert torch.equal(torch.cat([g[0] for g in got]), want_tokens), kind
            assert torch.equal(torch.cat([g[1] for g in got]), want_valid), kind
        if ranks[0].source.remote:
            cached = ranks[0]._store.folder
            assert sorted(p.name for p in cached.glob("*.tar")) == sorted(
                e["name"] for e in entries
            )
            stats = ranks[0].stats()
            assert stats["data/fetched_shards"] >= 1 and stats["data/skipped_shards"] == 0
        for r in ranks:
            r.close()

    # resume mid-step from a pipe: loader into an http loader (same DP layout)...
    a = _loader(specs["pipe-pattern"], tmp_path / "pipe-pattern", mbs=2, dp_rank=1, dp=2)
    for _ in range(5):
        a.next_global_batch()
    next(a)  # one micro-batch into step 6 (of 4)
    state = a.state_dict()
    b = _loader(specs["http-folder"], tmp_path / "resume", mbs=2, dp_rank=1, dp=2)
    b.load_state_dict(state)
    for _ in range(9):
        x, y = next(a), next(b)
        assert torch.equal(x["tokens"], y["tokens"]) and x["global_batch"] == y["global_batch"]
    # ... and at a step boundary into a DP=1 http loader: the reference's batches
    while a._micro_batch:
        next(a)
    boundary = a.state_dict()
    c = _loader(specs["http-pattern"], tmp_path / "resume2", mbs=8)
    c.load_state_dict(boundary)
    g = boundary["consumed_global_batches"]
    again = _loader(shards, tmp_path / "ref", mbs=4)
    again.load_state_dict(boundary)
    for _ in range(3):
        assert torch.equal(_step(c)[0], _step(again)[0])
    assert g > 5
    # a second loader on the same cache downloads nothing
    d = _loader(specs["http-folder"], tmp_path / "http-folder", mbs=16)
    for _ in range(reference.batches_per_epoch):
        d.next_global_batch()
    assert d.stats()["data/fetched_shards"] == 0


def test_failing_source(data: dict[str, Path], server: tuple[str, type], tmp_path: Path) -> None:
    """A pipe: command failing on one shard: retried, then an error naming the shard; with
    skip_bad_shards the run goes on and the skip is counted; peers sharing the cache agree."""
    shards = data["shards"]
    entries = read_manifest(shards).split("train")["shards"]
    bad = entries[2]["name"]
    attempts = tmp_path / "attempts.log"
    script = tmp_path / "fetch.sh"
    script.write_text(
        f'case "$1" in *{bad}) echo "$1" >> {attempts}; '
        'echo "simulated outage for $1" >&2; exit 3;; esac\n'
        'exec cat "$1"\n'
    )
    spec = _pattern(entries, f"pipe:sh {script} {shards}/")
    reference = _loader(shards, tmp_path / "ref", mbs=4)
    epoch = [_step(reference) for _ in range(reference.batches_per_epoch)]

    strict = _loader(spec, tmp_path / "strict", mbs=4, retries=2)
    with pytest.raises(ShardUnavailableError) as info:
        for _ in range(reference.batches_per_epoch):
            _step(strict)
    message = str(info.value)
    assert bad in message and "failed 3 attempt(s)" in message and "exit status 3" in message
    assert "simulated outage" in message
    assert len(attempts.read_text().splitlines()) == 3  # 1 + data.retries
    strict.close()

    attempts.unlink()
    skipping = _loader(spec, tmp_path / "skip", mbs=4, retries=1, skip_bad_shards=True)
    bad_index = [e["name"] for e in entries].index(bad)
    start = skipping._shard_start
    expected_skipped = 0
    for g, (want_tokens, want_valid) in enumerate(epoch):
        got_tokens, got_valid = _step(skipping)
        idx = reference.global_batch_indices(g)
        from_bad = (idx >= start[bad_index]) & (idx < start[bad_index + 1])
        expected_skipped += int(from_bad.sum())
        assert not got_valid[torch.from_numpy(from_bad)].any()  # empty rows: no loss
        keep = torch.from_numpy(~from_bad)
        assert torch.equal(got_tokens[keep], want_tokens[keep])
        assert torch.equal(got_valid[keep], want_valid[keep])
    stats = skipping.stats()
    assert (
        stats["data/skipped_shards"] == 1 and stats["data/skipped_samples"] == expected_skipped > 0
    )
    assert stats["data/failed_attempts"] == 2 and list(skipping.skipped_shards) == [bad]
    assert len(attempts.read_text().splitlines()) == 2

    # a peer sharing the cache (a TP rank of the same node) takes the same verdict, no new attempt
    peer = _loader(spec, tmp_path / "skip", mbs=4, retries=1, skip_bad_shards=True)
    for _ in range(reference.batches_per_epoch):
        _step(peer)
    assert peer.stats()["data/skipped_shards"] == 1
    assert len(attempts.read_text().splitlines()) == 2

    # HTTP: a server error, and a corrupt copy (checksum), both name the shard
    url, handler = server
    handler.fail.add(entries[1]["name"])
    try:
        http_loader = _loader(
            f"{url}/shards/", tmp_path / "http", mbs=16, retries=1, prefetch_shards=0
        )
        with pytest.raises(ShardUnavailableError, match=rf"{entries[1]['name']}.*HTTP 500"):
            for _ in range(reference.batches_per_epoch):
                _step(http_loader)
    finally:
        handler.fail.clear()
    corrupt = data["root"] / "serve" / "corrupt"
    shutil.copytree(shards, corrupt, dirs_exist_ok=True)
    victim = corrupt / entries[0]["name"]
    raw = bytearray(victim.read_bytes())
    raw[700] ^= 0xFF
    victim.write_bytes(bytes(raw))
    bad_copy = _loader(f"{url}/corrupt/manifest.json", tmp_path / "corrupt", mbs=16, retries=0)
    with pytest.raises(ShardUnavailableError, match=rf"{entries[0]['name']}.*sha256"):
        for _ in range(reference.batches_per_epoch):
            _step(bad_copy)
    assert not list((tmp_path / "corrupt").rglob(entries[0]["name"]))  # never cached under its name


def test_spec_parsing_and_cache_bound(data: dict[str, Path], tmp_path: Path) -> None:
    spec = parse_spec("pipe:aws s3 cp s3://bucket/owt/train-{000000..000002}.tar -")
    assert spec.kind == "pipe" and spec.names == (
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    )
    assert spec.manifest_location == "pipe:aws s3 cp s3://bucket/owt/manifest.json -"
    assert spec.location("valid-000000.tar") == "pipe:aws s3 cp s3://bucket/owt/valid-000000.tar -"
    spec = parse_spec("https://host/owt")
    assert spec.manifest_location == "https://host/owt/manifest.json" and spec.names is None
    assert (
        parse_spec("http:/host/owt/manifest.json").prefix == "http://host/owt/"
    )  # pathlib-collapsed
    spec = parse_spec("pipe:gsutil cat gs://b/owt/manifest.json")
    assert spec.location("train-000003.tar") == "pipe:gsutil cat gs://b/owt/train-000003.tar"
    with pytest.raises(ValueError, match="next to one manifest"):
        parse_spec("https://h/{a,b}/train-000000.tar")
    with pytest.raises(ValueError, match="must fetch the manifest"):
        parse_spec("pipe:cat something")
    with pytest.raises(ValueError, match="does not exist"):
        parse_spec(str(tmp_path / "nowhere"))
    shards = data["shards"]
    with pytest.raises(ValueError, match="not in"):
        open_source(f"{shards}/train-{{000000,999999}}.tar")
    # a pattern's valid split, located the same way; and a subset of shards
    entries = read_manifest(shards).split("train")["shards"]
    valid = open_source(_pattern(entries, f"pipe:cat {shards}/"), "valid")
    assert valid.split == "valid" and valid.locations[0] == f"pipe:cat {shards}/valid-000000.tar"
    subset = open_source(f"{shards}/train-{{000001..000003}}.tar")
    assert [s["name"] for s in subset.shards] == [e["name"] for e in entries[1:4]]
    assert subset.fingerprint != read_manifest(shards).fingerprint("train")
    # read_manifest takes any source spec
    assert read_manifest(f"pipe:cat {shards}/manifest.json").data == read_manifest(shards).data

    # a cache bounded to ~3 shards evicts and still gives the same batches
    size = max(e["bytes"] for e in entries)
    bounded = _loader(
        f"pipe:cat {shards}/manifest.json",
        tmp_path / "bounded",
        mbs=16,
        cache_max_gb=3.5 * size / 1e9,
        prefetch_shards=1,
    )
    reference = _loader(shards, tmp_path / "ref", mbs=16)
    for _ in range(reference.batches_per_epoch):
        assert torch.equal(_step(bounded)[0], _step(reference)[0])
    assert bounded.stats()["data/cache_evictions"] > 0
    assert len(list((bounded._store.folder).glob("*.tar"))) <= 4


# --------------------------------------------------------------------------------------------
# Preprocessing: the HF datasets adapter
# --------------------------------------------------------------------------------------------


def _texts(folder: Path) -> list[str]:
    out = []
    for file in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line)["text"] for line in file.read_text().splitlines()]
    return out


def test_preprocess_parquet(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local Parquet file (and Arrow: a .arrow file, a save_to_disk folder, --hf-dataset) through
    the datasets path gives byte-identical shards to the same texts as JSONL."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    texts = _texts(data["text"])
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=37)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"), max_shard_size="20KB")
    arrow_files = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrow_files) > 1
    common = dict(
        tokenizer=data["tok"],
        seq_length=24,
        layout="packed",
        valid_fraction=0.2,
        seed=3,
        shard_size_mb=0.02,
        workers=0,
        progress=False,
    )
    want = write_shards([jsonl], tmp_path / "from_jsonl", **common)
    got = {
        "parquet": write_shards([tmp_path / "corpus.parquet"], tmp_path / "from_parquet", **common),
        "save_to_disk": write_shards([tmp_path / "saved"], tmp_path / "from_saved", **common),
    }
    cli = _tool("preprocess_data")
    base = [
        "--tokenizer",
        str(data["tok"]),
        "--seq-length",
        "24",
        "--layout",
        "packed",
        "--valid-fraction",
        "0.2",
        "--seed",
        "3",
        "--shard-size-mb",
        "0.02",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert (
        cli.main(
            [
                "--hf-dataset",
                "parquet",
                "--hf-data-files",
                str(tmp_path / "corpus.parquet"),
                "--split",
                "train",
                "--output-dir",
                str(tmp_path / "from_hf"),
                *base,
            ]
        )
        == 0
    )
    got["--hf-dataset"] = read_manifest(tmp_path / "from_hf")
    assert (
        cli.main(
            ["--input", *map(str, arrow_files), "--output-dir", str(tmp_path / "from_arrow"), *base]
        )
        == 0
    )
    got["arrow files"] = read_manifest(tmp_path / "from_arrow")

    def shas(m: object) -> dict[str, list[str]]:
        return {n: [s["sha256"] for s in m.split(n)["shards"]] for n in ("train", "valid")}  # type: ignore[attr-defined]

    for how, manifest in got.items():
        assert shas(manifest) == shas(want), how
        assert manifest.fingerprint() == want.fingerprint(), how
        assert manifest["stats"]["num_documents"] == want["stats"]["num_documents"] == len(texts)
    assert got["--hf-dataset"]["inputs"] == [str(tmp_path / "corpus.parquet")]

    # a null text is reported by row (like a bad JSONL record) unless --skip-bad
    pq.write_table(
        pa.table({"text": ["one document", None, "another one"]}), tmp_path / "nulls.parquet"
    )
    with pytest.raises(
        ValueError, match=r"nulls\.parquet:2: no value in column 'text' \[missing_field\]"
    ):
        write_shards([tmp_path / "nulls.parquet"], tmp_path / "nulls", **common)
    kept = write_shards(
        [tmp_path / "nulls.parquet"],
        tmp_path / "nulls",
        skip_bad=True,
        **{**common, "valid_fraction": 0.0},
    )
    assert kept["stats"]["rejected"] == {"missing_field": 1} and kept["stats"]["num_documents"] == 2
    with pytest.raises(ValueError, match="no column 'body'"):
        write_shards([tmp_path / "corpus.parquet"], tmp_path / "nocol", json_key="body", **common)


def test_valid_last_documents_and_detokenizer(data: dict[str, Path], tmp_path: Path) -> None:
    """--valid-last-docs N: the valid split is exactly the last N documents (OWT convention)."""
    texts = _texts(data["text"])
    n_valid = 25
    manifest = write_shards(
        [data["text"]],
        tmp_path / "out",
        tokenizer=data["tok"],
        seq_length=32,
        layout="padded",
        valid_last_documents=n_valid,
        workers=0,
        progress=False,
    )
    assert manifest["split_method"]["valid_last_documents"] == n_valid
    assert manifest.split("valid")["num_documents"] == n_valid
    assert manifest.split("train")["num_documents"] == len(texts) - n_valid
    tok, info = load_tokenizer(data["tok"])
    rows = list(read_split(manifest, "valid"))
    for (row, length), text in zip(rows, texts[-n_valid:], strict=True):
        ids = tok.encode(text, add_special_tokens=False).ids[: 32 - 2]
        assert row[:length].tolist() == [info.bos_id, *ids, info.eos_id]
    with pytest.raises(ValueError, match="valid_last_documents"):
        write_shards(
            [data["text"]],
            tmp_path / "x",
            tokenizer=data["tok"],
            seq_length=32,
            layout="padded",
            valid_last_documents=3,
            valid_fraction=0.1,
            workers=0,
            progress=False,
        )
    detok = DETOKENIZERS["lm1b"]
    assert (
        detok('he said , " hello " ( yes ) it \'s $ 5 . ok ? fine .')
        == 'he said, "hello" (yes) it\'s $5. ok? fine.'
    )
    assert detok("see http : / / x.org / a") == "see http://x.org/a"


# --------------------------------------------------------------------------------------------
# docs/recipes.md, every command, on the bundled corpus
# --------------------------------------------------------------------------------------------


def _recipe_commands() -> list[str]:
    text = (ROOT / "docs" / "recipes.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def _write_raw(local_dir: Path, corpus: Path, name: str) -> None:
    """What `hf download` would fetch: the bundled corpus as Parquet files in the hub layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(corpus)
    if "lm1b" in name:  # one sentence per row, LM1B-style tokenized text
        lines = [
            " ".join(re.findall(r"\w+|[^\w\s]", ln))
            for t in texts
            for ln in t.splitlines()
            if ln.strip()
        ]
        splits = {"train": lines[:-200], "test": lines[-200:]}
    else:
        splits = {"train": texts}
    for split, rows in splits.items():
        folder = local_dir / "plain_text" / split
        folder.mkdir(parents=True, exist_ok=True)
        half = len(rows) // 2
        for k, part in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.table({"text": part}), folder / f"{k:04d}.parquet")


@pytest.mark.slow
def test_recipes_run_on_bundled_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of docs/recipes.md runs here: hub downloads become local Parquet files of the
    bundled corpus, hub tokenizers a local BPE, `aws s3` a folder; `sbatch` lines resolve their
    config against the recipe's shards, and the streamed OWT job trains two steps (tiny model)."""
    from megatron_lomdm.config import load_config
    from megatron_lomdm.data.blend import (
        build_train_loader,
        data_manifest,
        source_options,
        valid_source,
    )
    from megatron_lomdm.training.build import resolve_data_fields
    from tests.helpers.runs import clean_env

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, max_bytes=300_000)
    tok = tmp_path / "tok"
    train_bpe_tokenizer([corpus], tok, vocab_size=1024)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    cli = _tool("preprocess_data")
    subs = [
        (r"--tokenizer (gpt2|bert-base-uncased)", f"--tokenizer {tok}"),
        (r"--workers 32", "--workers 2"),
        (r"--workers \d+", "--workers 0"),
        (r"--valid-last-docs 100000", "--valid-last-docs 40"),
        (r"pipe:aws s3 cp s3://BUCKET/", "pipe:cat bucket/"),
        (r"data\.cache_dir=/local/scratch/lomdm_cache", "data.cache_dir=cache"),
    ]
    kinds: dict[str, int] = {}
    trained = False
    for command in _recipe_commands():
        for pattern, replacement in subs:
            command = re.sub(pattern, replacement, command)
        argv = shlex.split(command)
        if argv[:2] == ["hf", "download"]:
            _write_raw(tmp_path / argv[argv.index("--local-dir") + 1], corpus, argv[2])
            kind = "download"
        elif argv[:2] == ["python", "tools/preprocess_data.py"]:
            if "--hf-dataset" in argv:  # the hub name becomes the parquet builder on local files
                i = argv.index("--hf-dataset")
                files = sorted(str(p) for p in (tmp_path / "raw/owt").rglob("*.parquet"))
                argv[i + 1 : i + 2] = ["parquet", "--hf-data-files", *files]
                for flag in ("--hf-revision",):
                    j = argv.index(flag)
                    del argv[j : j + 2]
            assert cli.main([*argv[2:], "--no-progress"]) == 0, command
            kind = "preprocess"
        elif argv[:4] == ["aws", "s3", "cp", "--recursive"]:
            shutil.copytree(argv[4], tmp_path / "bucket" / argv[5].split("s3://BUCKET/")[1])
            kind = "publish"
        elif argv[0] == "sbatch":
            script = next(a for a in argv if a.startswith("slurm/"))
            rest = argv[argv.index(script) + 1 :]
            if script == "slurm/train.sh":
                config, overrides = (
                    rest[rest.index("--config") + 1],
                    rest[rest.index("--config") + 2 :],
                )
            else:
                config = re.search(r"--config \"\$ROOT/(\S+)\"", (ROOT / script).read_text()).group(
                    1
                )
                overrides = rest
            cfg = load_config(ROOT / config, overrides)
            options = source_options(cfg.data, tmp_path / "run")
            cfg = resolve_data_fields(cfg, data_manifest(cfg.data.train, options))
            loader = build_train_loader(
                cfg.data,
                micro_batch_size=2,
                global_batch_size=4,
                dp_rank=0,
                dp_size=1,
                seed=cfg.train.seed,
                run_dir=tmp_path / "run",
            )
            batch = loader.next_global_batch()
            assert batch[0]["tokens"].shape == (2, cfg.model.seq_length)
            spec, split = valid_source(cfg.data, tmp_path / "run")
            valid = ShardLoader(
                spec,
                split=split,
                micro_batch_size=1,
                global_batch_size=1,
                dp_rank=0,
                dp_size=1,
                seed=0,
                source_options=options,
            )
            assert next(valid)["valid"].any()
            loader.close()
            valid.close()
            if any(o.startswith("data.train=pipe:") for o in overrides):
                tiny = [
                    "run.dir=runs/owt_recipe",
                    "model.num_layers=1",
                    "model.hidden_size=32",
                    "model.num_heads=2",
                    "model.recompute=none",
                    "parallel.tp=1",
                    "parallel.zero=0",
                    "parallel.overlap_grad_reduce=false",
                    "train.precision=fp32",
                    "train.steps=2",
                    "train.micro_batch_size=2",
                    "train.global_batch_size=4",
                    "train.eval_interval=0",
                    "train.log_interval=1",
                    "tracking.enabled=false",
                    "checkpoint.interval=0",
                    "optim.warmup_steps=1",
                    "data.cache_dir=cache_of_the_job",
                ]
                run = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "megatron_lomdm.train",
                        "--config",
                        str(ROOT / config),
                        *overrides,
                        *tiny,
                    ],
                    cwd=tmp_path,
                    env=clean_env(),
                    capture_output=True,
                    text=True,
                    timeout=240,
                )
                assert run.returncode == 0, run.stderr[-3000:]
                metrics = [
                    json.loads(line)
                    for line in (tmp_path / "runs/owt_recipe/metrics.jsonl")
                    .read_text()
                    .splitlines()
                ]
                assert len(metrics) == 2 and metrics[-1]["data/fetched_shards"] >= 1
                assert metrics[-1]["data/skipped_shards"] == 0
                trained = True
            kind = "sbatch"
        else:
            pytest.fail(f"docs/recipes.md command not covered by this test: {command}")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {"download": 2, "preprocess": 6, "sbatch": 4, "publish": 1} and trained
    owt = read_manifest(tmp_path / "data/owt")
    assert (
        owt.seq_length == 1024 and owt["frame_chunks"] and owt.split("valid")["num_documents"] == 40
    )
    assert read_manifest(tmp_path / "data/owt_streamed").fingerprint() == owt.fingerprint()
    assert read_manifest(tmp_path / "data/lm1b")["detokenizer"] == "lm1b"
    assert read_manifest(tmp_path / "data/lm1b_packed_test").split("train")["num_samples"] > 0
