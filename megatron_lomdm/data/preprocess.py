"""Text -> a shard folder, in stages (``write_shards``; the CLI of ``tools/preprocess_data.py``).

The stages: check the job (``ShardJob``), list the inputs, load the tokenizer, open the output (a
hidden temporary folder), tokenize the documents (worker processes, ``tokenize``) and lay them out
into rows and shards (``writer``), close the splits, write the manifest (``format``) and the wids
indexes, publish the folder (one rename). The format and the layouts: ``format``.

Atomicity. Output goes to the hidden sibling ``.NAME.incomplete``; shards are written as
``*.tar.tmp`` and renamed when closed; the manifest is written last and the folder renamed to
``NAME`` at the very end. A crash therefore never leaves a folder with a ``manifest.json``.
A rerun removes a leftover ``.NAME.incomplete`` and starts over (no partial resume); a rerun
into a complete folder is refused unless ``overwrite``, and a folder this tool did not write (one
holding anything but a manifest of this format and the files it names) is never replaced. A write
that fails (full disk, read-only folder) raises ``OSError`` naming the file, after removing the
temporary folder.

Memory. Documents longer than ``tokenize.DOCUMENT_CHUNK_CHARS`` (256 Ki characters) are tokenized
in chunks (``tokenize.DocumentEncoder``), so one huge document costs about 15 bytes of memory per
byte of its record (its text, ~30 bytes per token of ids and packing, at most one token per byte)
plus ~40 MB of tokenizer working set per process, instead of ~150 bytes per byte. Measured peak
RSS for one 20 MB single-line JSONL document: 0.33 GB (was 2.9 GB).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import errno
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from megatron_lomdm.data.format import (
    FORMAT_NAME,
    COND_FORMAT_VERSION,
    COND_MEMBER,
    LAYOUTS,
    LENGTHS_MEMBER,
    MANIFEST_NAME,
    TOKENS_MEMBER,
    PLAIN_FORMAT_VERSION,
    Manifest,
    read_local_manifest,
    storage_dtype,
)
from megatron_lomdm.data.tokenize import (
    DETOKENIZERS,
    ERROR_REASONS,
    TEXT_MODES,
    BadRecord,
    DocumentEncoder,
    EncodedBatch,
    HFDatasetInput,
    TokenizerInfo,
    bad_record_message,
    batched_records,
    encode_in_worker,
    expand_inputs,
    init_worker,
    is_datasets_file,
    is_jsonl,
    load_tokenizer,
)
from megatron_lomdm.data.writer import (
    CONDITIONING_NEEDS_PADDED,
    Packer,
    Padder,
    SplitWriter,
    make_layout,
    naming,
)
from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["ShardJob", "cli_parser", "main", "os_error_message", "write_shards"]

_MAX_BLOCK_BYTES = 1 << 20  # target size of one block's tokens member
_PROG = "preprocess_data.py"
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What ``write_shards`` writes: its arguments.

    Attributes:
        inputs: files, folders or globs: JSONL (by suffix: .jsonl/.json/.ndjson) or plain text,
            optionally .gz/.bz2/.xz/.zst; Parquet / Arrow files (and ``save_to_disk`` folders)
            are read through HF ``datasets``. May be empty when ``hf_dataset`` is given.
        output_dir: the folder to create.
        tokenizer: a local tokenizer file/folder or an HF hub name.
        seq_length: tokens per sequence.
        layout: ``packed`` or ``padded``.
        workers: tokenizer processes; 0 tokenizes in this process (tests, debugging).
        valid_fraction: fraction of documents (by a seeded hash of their text) in the valid split.
        json_key: the text field of JSONL records.
        text_mode: plain text as one document per ``file`` or per ``line``.
        shard_size_mb: target shard size (a shard closes at the first block boundary past it).
        skip_bad: skip and count bad records instead of raising.
        seed: seeds the train/valid split hash.
        frame_chunks: packed rows as ``[BOS] + seq_length-2 tokens + [EOS]`` (MDLM ``wrap``).
        overwrite: replace a complete (or foreign, non-empty) ``output_dir``.
        progress: show a tqdm bar.
        command: the command line to record (defaults to this process's ``sys.argv``).
        batch_docs: records per encoder task.
        batch_mb: raw megabytes per encoder task (whichever limit is hit first).
        hf_dataset: an HF ``datasets`` input (hub, streamed), read after ``inputs``.
        valid_last_documents: the valid split is the last N documents of the input order (the
            OpenWebText convention ``train[-100000:]``); exclusive with ``valid_fraction``.
        detokenizer: rewrite each document first (``DETOKENIZERS``: ``lm1b``).
        prompt_key: the prompt field of JSONL prompt/response records; set, each record becomes
            one ``padded`` row ``[BOS] prompt response [EOS]`` whose ``[BOS] prompt`` positions
            are conditioned (``format``); ``None``: plain documents.
        response_key: the response field of prompt/response records.
        ids_key: pre-tokenized JSONL records (no tokenizing): the field of the token ids; each
            record becomes one ``padded`` row ``[BOS] ids [EOS]`` with ``[BOS]`` and the ids
            marked by ``cond_key`` conditioned (in-place infilling, e.g. a Sudoku's givens);
            ``None``: text records.
        cond_key: the field of a pre-tokenized record's 0/1 per id (1: given).
    """

    inputs: tuple[str | Path, ...]
    output_dir: str | Path
    tokenizer: str | Path
    seq_length: int
    layout: str = "packed"
    workers: int = 1
    valid_fraction: float = 0.0
    json_key: str = "text"
    text_mode: str = "file"
    shard_size_mb: float = 128.0
    skip_bad: bool = False
    seed: int = 0
    frame_chunks: bool = False
    overwrite: bool = False
    progress: bool = True
    command: Sequence[str] | None = None
    batch_docs: int = 256
    batch_mb: float = 4.0
    hf_dataset: HFDatasetInput | None = None
    valid_last_documents: int = 0
    detokenizer: str | None = None
    prompt_key: str | None = None
    response_key: str = "response"
    ids_key: str | None = None
    cond_key: str = "cond"

    @property
    def conditioned(self) -> bool:
        """Prompt/response or pre-tokenized records (a conditioning mask per row)."""
        return self.prompt_key is not None or self.ids_key is not None

    @property
    def text_key(self) -> str:
        """The field the encoder reads as the document (the response of a pair)."""
        return self.response_key if self.conditioned else self.json_key

    def check(self) -> None:
        """Raises ``ValueError`` on a bad argument (before anything is read or written)."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if self.frame_chunks and self.layout != "packed":
            raise ValueError("frame_chunks applies to the packed layout only")
        if self.valid_last_documents < 0 or (self.valid_last_documents and self.valid_fraction):
            raise ValueError(
                "valid_last_documents must be >= 0 and not combined with valid_fraction"
            )
        if self.conditioned and self.layout != "padded":
            raise ValueError(CONDITIONING_NEEDS_PADDED)
        if self.conditioned and self.hf_dataset is not None:
            raise ValueError("prompt/response records (--prompt-key) are read from JSONL files only")
        if self.prompt_key is not None and self.ids_key is not None:
            raise ValueError("give --prompt-key (text records) or --ids-key (pre-tokenized), not both")
        if self.ids_key is not None and self.detokenizer is not None:
            raise ValueError("pre-tokenized records (--ids-key) are not detokenized")
        if self.detokenizer is not None and self.detokenizer not in DETOKENIZERS:
            raise ValueError(
                f"detokenizer must be one of {sorted(DETOKENIZERS)}, got {self.detokenizer!r}"
            )

    @property
    def split_names(self) -> list[str]:
        """``train``, and ``valid`` when some documents go there."""
        return ["train", "valid"] if self.valid_fraction > 0 or self.valid_last_documents else ["train"]

    @property
    def out(self) -> Path:
        """The output folder (absolute)."""
        return Path(self.output_dir).absolute()


# --------------------------------------------------------------------------------------------
# write_shards
# --------------------------------------------------------------------------------------------


def write_shards(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: str | Path,
    seq_length: int,
    **options: Any,
) -> Manifest:
    """Tokenize raw text into WebDataset shards plus ``manifest.json`` (see the module docstring).

    Args:
        inputs, output_dir, tokenizer, seq_length, options: the fields of ``ShardJob``.

    Returns:
        The manifest of the published folder.

    Raises:
        ValueError: bad arguments, a bad record (``file:line``) unless ``skip_bad``, an empty
            input, an existing output folder without ``overwrite``, or a folder this function did
            not write (never replaced). Nothing that looks complete is left behind.
        OSError: a file that cannot be written (full disk, read-only folder), its ``filename``
            set; the temporary output is removed.
    """
    job = ShardJob(tuple(inputs or ()), output_dir, tokenizer, seq_length, **options)
    job.check()
    files = _input_files(job)
    tok, info = load_tokenizer(job.tokenizer)
    _check_seq_length(job.seq_length, job.layout, job.frame_chunks, info)
    logger.info(
        "preprocessing %d input file(s) with %d worker(s) into %s", len(files), job.workers, job.out
    )
    tmp = _prepare_output(job.out, job.overwrite)
    try:
        manifest, examples = _write(job, files, tok, info, tmp)
        _publish(tmp, job.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_summary(job.out, manifest, examples)
    return read_local_manifest(job.out)


def _input_files(job: ShardJob) -> list[Any]:
    """The input files in order (``tokenize.expand_inputs``), then the HF dataset if any."""
    files: list[Any] = expand_inputs(job.inputs) if job.inputs or job.hf_dataset is None else []
    other = [str(p) for p in files if job.conditioned and not is_jsonl(p)]
    if other:
        raise ValueError(
            f"{other[0]}: not a JSONL file; prompt/response and pre-tokenized records (--prompt-key, "
            "--ids-key) are read from JSONL files (.jsonl/.json/.ndjson) only"
        )
    if job.hf_dataset is not None:
        files.append(job.hf_dataset)
    return files


def _write(
    job: ShardJob, files: list[Any], tok: Any, info: TokenizerInfo, tmp: Path
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every stage that writes into ``tmp``: the shards, the wids indexes, the manifest (last).

    Returns:
        The manifest and examples of rejected records (per reason, for the summary).
    """
    writers = _open_splits(job, info, tmp)
    layouts = {name: make_layout(job.layout, w, info, job.frame_chunks) for name, w in writers.items()}
    consumer, bar = _tokenize(job, files, tok, layouts)
    consumer.finish()
    for layout in layouts.values():
        layout.finish()
    results = {name: w.finish() for name, w in writers.items()}
    stats = _stats(job, files, bar, consumer)
    _check_results(list(job.inputs) or [str(job.hf_dataset)], stats, results, job.valid_fraction)
    manifest = _manifest(job, files, info, writers["train"], stats, results)
    _write_wids_indexes(tmp, job.out.name, results)
    _write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest, consumer.examples


def _open_splits(job: ShardJob, info: TokenizerInfo, tmp: Path) -> dict[str, SplitWriter]:
    """One writer per split; blocks of about 1 MB (at most 1/8 of a shard)."""
    dtype = storage_dtype(info.vocab_size)
    shard_bytes = max(int(job.shard_size_mb * 1e6), 1)
    block_rows = max(
        1, min(_MAX_BLOCK_BYTES, shard_bytes // 8) // (job.seq_length * dtype.itemsize)
    )
    return {
        name: SplitWriter(
            tmp,
            name,
            seq_length=job.seq_length,
            dtype=dtype,
            pad_id=info.pad_id,
            shard_bytes=shard_bytes,
            block_rows=block_rows,
            conditioned=job.conditioned,
        )
        for name in job.split_names
    }


def _tokenize(
    job: ShardJob, files: list[Any], tok: Any, layouts: dict[str, Packer | Padder]
) -> tuple[_Consumer, _Progress]:
    """Encode every record (``job.workers`` processes) and hand the documents to the layouts."""
    unknown_size = any(
        not isinstance(p, Path) or is_datasets_file(p) or p.suffix.lower() in _COMPRESSED
        for p in files
    )
    bar = _Progress(
        enabled=job.progress,
        total_bytes=None if unknown_size else sum(p.stat().st_size for p in files),
    )
    consumer = _Consumer(files, layouts, job.skip_bad, bar, valid_last=job.valid_last_documents)
    tasks = batched_records(
        files,
        text_mode=job.text_mode,
        max_docs=job.batch_docs,
        max_bytes=int(job.batch_mb * 1e6),
        text_field=job.json_key,
    )
    train = layouts["train"]
    max_prompt = train.max_prompt_tokens if job.conditioned and isinstance(train, Padder) else None
    room = train.room if isinstance(train, Padder) else None
    pretokenized = None if job.ids_key is None else (job.ids_key, job.cond_key, room)
    encoder_args = (
        tok.to_str(), job.text_key, job.valid_fraction, job.seed, job.detokenizer, job.prompt_key,
        max_prompt, pretokenized,
    )  # fmt: skip
    try:
        _run_encoders(tasks, consumer, job.workers, encoder_args)
    finally:
        bar.close()
    return consumer, bar


def _stats(
    job: ShardJob, files: list[Any], bar: _Progress, consumer: _Consumer
) -> dict[str, Any]:
    """The manifest's ``stats``: counts, rejected records and rates."""
    return {
        "num_input_files": len(files),
        "num_documents": bar.documents,
        "num_raw_tokens": bar.tokens,
        "input_bytes": bar.bytes,
        "rejected": dict(sorted(consumer.rejected.items())),
        "workers": job.workers,
        **{k: round(v, 3) for k, v in bar.rates().items()},
    }


def _manifest(
    job: ShardJob,
    files: list[Any],
    info: TokenizerInfo,
    writer: SplitWriter,
    stats: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``manifest.json`` (``format``)."""
    members = {
        TOKENS_MEMBER: f"(rows, {job.seq_length}) {writer.dtype.name}",
        LENGTHS_MEMBER: "(rows,) int32",
    }
    if job.conditioned:
        members[COND_MEMBER] = f"(rows, {-(-job.seq_length // 8)}) uint8 packbits"
    return {
        "format": FORMAT_NAME,
        "format_version": COND_FORMAT_VERSION if job.conditioned else PLAIN_FORMAT_VERSION,
        "complete": True,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": list(job.command) if job.command is not None else [sys.executable, *sys.argv],
        "inputs": [str(p) for p in files],
        "layout": job.layout,
        "frame_chunks": bool(job.frame_chunks),
        "seq_length": job.seq_length,
        "dtype": writer.dtype.name,
        "sample_format": {
            "members": members,
            "block_rows": writer.block_rows,
            "pad_id": info.pad_id,
        },
        "tokenizer": info.to_dict(),
        "split_method": _split_method(job),
        "detokenizer": job.detokenizer,
        "text_mode": job.text_mode,
        "json_key": job.json_key,
        **(_conditioning(job) if job.conditioned else {}),
        "stats": stats,
        "splits": results,
    }


def _conditioning(job: ShardJob) -> dict[str, Any]:
    """The manifest keys of a conditioned folder."""
    if job.ids_key is not None:
        return {"conditioned": True, "pretokenized": {"ids_key": job.ids_key, "cond_key": job.cond_key}}
    return {"conditioned": True, "prompt_key": job.prompt_key, "response_key": job.response_key}


def _split_method(job: ShardJob) -> dict[str, Any]:
    if job.valid_last_documents:
        return {
            "by": "the last documents of the input order",
            "valid_last_documents": job.valid_last_documents,
        }
    return {
        "by": "blake2b hash of the document text",
        "seed": job.seed,
        "valid_fraction": job.valid_fraction,
    }


def _check_seq_length(
    seq_length: int, layout: str, frame_chunks: bool, info: TokenizerInfo
) -> None:
    if frame_chunks and info.bos_id is None:
        raise ValueError(f"frame_chunks needs a BOS token; tokenizer {info.name_or_path} has none")
    if layout == "padded":
        min_length = 2 + (info.bos_id is not None)  # [BOS] >= 1 token [EOS]
    else:
        min_length = 3 if frame_chunks else 2
    if seq_length < min_length:
        raise ValueError(f"seq_length={seq_length} is too short for layout {layout!r} with BOS/EOS")


def _check_results(
    inputs: Sequence[str | Path],
    stats: dict[str, Any],
    results: dict[str, Any],
    valid_fraction: float,
) -> None:
    if stats["num_documents"] == 0:
        raise ValueError(
            f"empty input: no document found in {[str(p) for p in inputs]} "
            f"(rejected: {stats['rejected']})"
        )
    if results["train"]["num_samples"] == 0:
        raise ValueError("no training sample was produced (every document went to the valid split)")
    if "valid" in results and results["valid"]["num_samples"] == 0:
        logger.warning(
            "valid_fraction=%g selected no document: the valid split is empty", valid_fraction
        )


def _write_wids_indexes(folder: Path, name: str, results: dict[str, Any]) -> None:
    """``wids-SPLIT.json``: shard lists for ``wids.ShardListDataset`` (its samples are blocks)."""
    for split, result in results.items():
        index = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "name": f"{name}-{split}",
            "shardlist": [
                {"url": s["name"], "nsamples": s["num_blocks"], "filesize": s["bytes"]}
                for s in result["shards"]
            ],
        }
        _write_json_atomic(folder / f"wids-{split}.json", index)


def _run_encoders(
    tasks: Iterable[Any], consume: _Consumer, workers: int, encoder_args: tuple[Any, ...]
) -> None:
    """Encode tasks in order: in-process (``workers == 0``) or with a bounded process pool."""
    if workers == 0:
        encoder = DocumentEncoder(
            encoder_args[0],
            json_key=encoder_args[1],
            valid_fraction=encoder_args[2],
            seed=encoder_args[3],
            detokenizer=encoder_args[4] if len(encoder_args) > 4 else None,
            prompt_key=encoder_args[5] if len(encoder_args) > 5 else None,
            max_prompt_tokens=encoder_args[6] if len(encoder_args) > 6 else None,
            pretokenized=encoder_args[7] if len(encoder_args) > 7 else None,
        )
        for task in tasks:
            consume(encoder.encode(*task))
        return
    # spawn: never fork a process whose Rust thread pool may be running. A worker that dies (e.g.
    # an unguarded __main__ in the caller's script) breaks the executor instead of hanging.
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=encoder_args,
    )
    pending: collections.deque[Future[EncodedBatch]] = collections.deque()
    try:
        for task in tasks:
            pending.append(executor.submit(encode_in_worker, task))
            while len(pending) >= 2 * workers:  # bounded read-ahead: bounded memory
                consume(pending.popleft().result())
        while pending:
            consume(pending.popleft().result())
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _log_summary(out: Path, manifest: dict[str, Any], examples: dict[str, list[str]]) -> None:
    stats = manifest["stats"]
    logger.info(
        "done in %.1f s: %d documents, %.2f MB, %d tokens "
        "(%.0f docs/s, %.2f MB/s, %.0f tokens/s, %d worker(s))",
        stats["seconds"],
        stats["num_documents"],
        stats["input_bytes"] / 1e6,
        stats["num_raw_tokens"],
        stats["docs_per_s"],
        stats["mb_per_s"],
        stats["tokens_per_s"],
        stats["workers"],
    )
    for name, split in manifest["splits"].items():
        logger.info(
            "  %s: %d documents -> %d sequences of %d (%d real tokens) in %d shard(s)%s",
            name,
            split["num_documents"],
            split["num_samples"],
            manifest["seq_length"],
            split["num_tokens"],
            len(split["shards"]),
            f", {split['num_truncated_documents']} truncated"
            if split["num_truncated_documents"]
            else "",
        )
    for reason, count in stats["rejected"].items():
        logger.info(
            "  skipped %d record(s): %s (e.g. %s)",
            count,
            reason,
            ", ".join(examples.get(reason, [])),
        )
    logger.info("wrote %s", out / MANIFEST_NAME)


# --------------------------------------------------------------------------------------------
# Progress, records -> splits, the output folder
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Progress:
    """Running totals and a tqdm bar with docs/s, MB/s and tokens/s."""

    enabled: bool
    total_bytes: int | None
    start: float = dataclasses.field(default_factory=time.perf_counter)
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    _last: float = 0.0

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_bytes,
            unit="B",
            unit_scale=True,
            disable=not self.enabled,
            desc="tokenizing",
            mininterval=0.5,
            smoothing=0.1,
        )

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        self.bar.update(num_bytes)
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.5:
            self._last = now
            self.bar.set_postfix_str(self._rates_str(), refresh=False)

    def rates(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return {
            "seconds": seconds,
            "docs_per_s": self.documents / seconds,
            "mb_per_s": self.bytes / 1e6 / seconds,
            "tokens_per_s": self.tokens / seconds,
        }

    def _rates_str(self) -> str:
        r = self.rates()
        return f"{r['docs_per_s']:.0f} docs/s, {r['tokens_per_s'] / 1e3:.0f}k tok/s"

    def close(self) -> None:
        if self.enabled:
            self.bar.set_postfix_str(self._rates_str(), refresh=False)
        self.bar.close()


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise ValueError(
            f"{out} already holds a complete shard folder; pass --overwrite to replace it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        foreign = _foreign_entries(out)
        if foreign:
            raise ValueError(
                f"{out} is not a shard folder written by tools/preprocess_data.py (it holds "
                f"{', '.join(foreign)}); refusing to replace it, with or without --overwrite: "
                "choose another --output-dir or remove it yourself"
            )
    tmp = out.parent / f".{out.name}.incomplete"
    if tmp.exists():
        logger.warning("removing %s left by an interrupted run; starting over", tmp)
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:  # e.g. a read-only parent: name what the user asked for
        raise OSError(err.errno, err.strerror, str(out)) from err
    return tmp


def _foreign_entries(out: Path) -> list[str]:
    """What in ``out`` this tool did not write (at most 5 names); [] for one of its datasets:
    a ``manifest.json`` of this format plus the shards and ``wids-*.json`` files it names."""
    if not out.is_dir():
        return [f"{out.name} (not a folder)"]
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        ours = {MANIFEST_NAME} | {
            name
            for split, entry in data["splits"].items()
            for name in (f"wids-{split}.json", *(s["name"] for s in entry["shards"]))
        }
        if data.get("format") != FORMAT_NAME:
            ours = set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = set()
    names = sorted(p.name for p in out.iterdir())
    return [n for n in names if n not in ours][:5] if ours else names[:5]


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``tmp`` folder (rename; the old folder is removed)."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


#: Documents in flight: concatenated ids, lengths, and per id whether it is given (``None``: none).
Document = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _given(batch: EncodedBatch) -> np.ndarray | None:
    """Per id of the batch, whether it is given (a prompt's or a pre-tokenized record's cond)."""
    if batch.given is not None:
        return batch.given
    if batch.prompt_lengths is None:
        return None
    starts = np.cumsum(batch.lengths) - batch.lengths
    offset = np.arange(int(batch.lengths.sum())) - np.repeat(starts, batch.lengths)
    return offset < np.repeat(batch.prompt_lengths, batch.lengths)


class _Consumer:
    """Turns encoded batches into rows of the two splits and applies the bad-record policy.

    With ``valid_last`` > 0 the valid split is the last ``valid_last`` documents of the input
    order (held back until the end; the earlier ones go to train as soon as they are known not to
    be among the last).
    """

    def __init__(
        self,
        files: Sequence[Any],
        splits: dict[str, Any],
        skip_bad: bool,
        progress: _Progress,
        valid_last: int = 0,
    ) -> None:
        self.files, self.splits, self.skip_bad, self.progress = files, splits, skip_bad, progress
        self.rejected: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.valid_last = valid_last
        self.held: collections.deque[Document] = collections.deque()
        self.held_docs = 0

    def __call__(self, batch: EncodedBatch) -> None:
        path = self.files[batch.file_index]
        for line, reason, detail in batch.rejected:
            if reason in ERROR_REASONS and not self.skip_bad:
                raise ValueError(bad_record_message(path, line, BadRecord(reason, detail)))
            self.rejected[reason] += 1
            if len(self.examples[reason]) < 5:
                self.examples[reason].append(f"{path}:{line}")
        doc_ends = np.cumsum(batch.lengths)
        given = _given(batch)
        if self.valid_last:
            self._hold(batch.ids, batch.lengths, given)
            self.progress.update(
                len(batch.lengths), int(doc_ends[-1]) if len(doc_ends) else 0, batch.num_bytes
            )
            return
        for name, selected in (("train", ~batch.to_valid), ("valid", batch.to_valid)):
            if not selected.any():
                continue
            if name not in self.splits:
                raise AssertionError("valid documents without a valid split")
            if selected.all():  # no copy (one huge document is many tokens)
                self.splits[name].add(batch.ids, batch.lengths, given)
                continue
            token_mask = np.repeat(selected, batch.lengths)
            self.splits[name].add(
                batch.ids[token_mask],
                batch.lengths[selected],
                None if given is None else given[token_mask],
            )
        self.progress.update(
            len(batch.lengths), int(doc_ends[-1]) if len(doc_ends) else 0, batch.num_bytes
        )

    def _hold(self, ids: np.ndarray, lengths: np.ndarray, given: np.ndarray | None) -> None:
        if not len(lengths):
            return
        self.held.append((ids, lengths, given))
        self.held_docs += len(lengths)
        excess = self.held_docs - self.valid_last
        while excess > 0:
            first_ids, first_lengths, first_given = self.held[0]
            if len(first_lengths) <= excess:
                self.held.popleft()
                self.splits["train"].add(first_ids, first_lengths, first_given)
                self.held_docs -= len(first_lengths)
                excess -= len(first_lengths)
            else:
                cut = int(first_lengths[:excess].sum())
                head, tail = _cut(first_given, cut)
                self.splits["train"].add(first_ids[:cut], first_lengths[:excess], head)
                self.held[0] = (first_ids[cut:], first_lengths[excess:], tail)
                self.held_docs -= excess
                excess = 0

    def finish(self) -> None:
        """Send the held-back last documents to the valid split."""
        while self.held:
            self.splits["valid"].add(*self.held.popleft())
        self.held_docs = 0


def _cut(given: np.ndarray | None, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    return (None, None) if given is None else (given[:n], given[n:])


# --------------------------------------------------------------------------------------------
# The command line (tools/preprocess_data.py)
# --------------------------------------------------------------------------------------------


def cli_parser(description: str) -> argparse.ArgumentParser:
    """The options of ``tools/preprocess_data.py``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="files, folders or globs (.jsonl/.json/.ndjson or text; .gz/.bz2/.xz/.zst; "
        ".parquet/.arrow and save_to_disk folders through HF datasets)",
    )
    hf = p.add_argument_group("HF datasets hub input (instead of --input; streamed)")
    hf.add_argument("--hf-dataset", metavar="NAME", help="hub dataset, e.g. Skylion007/openwebtext")
    hf.add_argument("--hf-config", metavar="C", help="dataset configuration")
    hf.add_argument("--split", default="train", help="dataset split (default: train)")
    hf.add_argument("--hf-revision", metavar="REV", help="hub revision, e.g. refs/convert/parquet")
    hf.add_argument("--hf-data-files", nargs="+", metavar="F", help="data files of the dataset")
    p.add_argument("--output-dir", required=True, help="folder to create")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, a tokenizer folder, or an HF hub name"
    )
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        required=True,
        help="packed (docs joined, cut) or padded (one doc per row)",
    )
    _add_processing_arguments(p)
    return p


def _add_processing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (0: in the main process)"
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.0, help="fraction of documents in the valid split"
    )
    p.add_argument(
        "--valid-last-docs",
        type=int,
        default=0,
        metavar="N",
        help="the valid split is the last N documents of the input (OpenWebText: 100000)",
    )
    p.add_argument(
        "--detokenize", choices=sorted(DETOKENIZERS), help="rewrite documents first (lm1b)"
    )
    p.add_argument(
        "--json-key",
        "--text-field",
        dest="json_key",
        default="text",
        help="text field of JSONL records / text column of datasets rows",
    )
    p.add_argument(
        "--prompt-key",
        metavar="FIELD",
        help="JSONL prompt/response records: the prompt field (its tokens are conditioned, never "
        "masked); needs --layout padded",
    )
    p.add_argument(
        "--response-key",
        metavar="FIELD",
        default="response",
        help="the response field of prompt/response records (default: response)",
    )
    p.add_argument(
        "--ids-key",
        metavar="FIELD",
        help="pre-tokenized JSONL records (e.g. tools/make_puzzles.py's: --ids-key tokens): the field "
        "of the token ids, written as they are (no tokenizing); needs --layout padded",
    )
    p.add_argument(
        "--cond-key",
        metavar="FIELD",
        default="cond",
        help="pre-tokenized records: the field of 0/1 per id, 1 = given (conditioned, never "
        "masked; default: cond)",
    )
    p.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="file",
        help="plain text: one document per file or per line",
    )
    _add_output_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size-mb", type=float, default=128.0, help="target shard size")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip and count bad records instead of failing"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split hash")
    p.add_argument(
        "--frame-chunks",
        action="store_true",
        help="packed rows as [BOS] + L-2 tokens + [EOS] (MDLM wrap)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing complete output folder"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
    """Run ``tools/preprocess_data.py``'s command line; returns the exit status (2: an error)."""
    args = cli_parser(description or __doc__.splitlines()[0]).parse_args(argv)
    if bool(args.input) == bool(args.hf_dataset):
        sys.stderr.write(f"{_PROG}: error: pass --input or --hf-dataset (one of them)\n")
        return 2
    try:
        write_shards(args.input, args.output_dir, **_job_options(args))
    except ValueError as err:
        sys.stderr.write(f"{_PROG}: error: {err}\n")
        return 2
    except OSError as err:
        message = os_error_message(err, args.output_dir)
        sys.stderr.write(f"{_PROG}: error: {message}\n")
        return 2
    return 0


#: ``ShardJob`` fields spelled as their command-line options.
_SAME_NAMES = (
    "tokenizer", "seq_length", "layout", "workers", "valid_fraction", "json_key", "text_mode",
    "shard_size_mb", "skip_bad", "seed", "frame_chunks", "overwrite", "prompt_key",
    "response_key", "ids_key", "cond_key",
)  # fmt: skip


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """``write_shards``' options from the command line."""
    hf_dataset = None
    if args.hf_dataset:
        hf_dataset = HFDatasetInput(
            name=args.hf_dataset,
            config=args.hf_config,
            split=args.split,
            data_files=tuple(args.hf_data_files) if args.hf_data_files else None,
            revision=args.hf_revision,
        )
    options = {name: getattr(args, name) for name in _SAME_NAMES}
    return options | dict(
        progress=not args.no_progress,
        command=[sys.executable, *sys.argv],
        hf_dataset=hf_dataset,
        valid_last_documents=args.valid_last_docs,
        detokenizer=args.detokenize,
    )


def os_error_message(err: OSError, output_dir: str) -> str:
    """One line naming the path of a failed read or write (the output folder when unknown)."""
    name = errno.errorcode.get(err.errno or 0, "")
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = " (the file system is full, or a quota or file-size limit was hit)"
    reason = err.strerror or str(err)
    code = f" [{name}]" if name else ""
    return f"{err.filename or output_dir}: {reason}{code}{hint}; nothing was published"
