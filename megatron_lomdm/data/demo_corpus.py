"""A small English JSONL corpus built from text that ships with Python (no download).

Two files, one JSON object per line (``{"text": ..., "source": ...}``):

* ``pydoc_topics.jsonl``: the ``pydoc_data.topics`` help topics (about 0.5 MB of prose);
* ``stdlib_docstrings.jsonl``: module, class and function docstrings of the standard-library
  sources, read with ``ast`` (nothing is imported), files in sorted order.

The result is deterministic for a given Python build (about 1.9 MB on CPython 3.11).
Usage: ``python -m megatron_lomdm.data.demo_corpus OUT_DIR``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from megatron_lomdm.utils.logging import get_logger

logger = get_logger(__name__)

# Standard-library packages that are tests, GUIs, vendored tools or generated data.
_SKIP_PACKAGES = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "turtledemo",
        "pydoc_data",
    }
)
_MIN_DOCSTRING_CHARS = 40


def _topic_documents() -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name].strip(), "source": f"pydoc_data.topics:{name}"}


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    return [f for f in files if f.parent == root or f.parent.name not in _SKIP_PACKAGES]


def _docstring_documents() -> Iterator[dict[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources():
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < _MIN_DOCSTRING_CHARS:
                continue
            name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
            yield {"text": doc.strip(), "source": f"docstring:{name}"}


def write_demo_corpus(out_dir: str | Path, *, max_bytes: int | None = None) -> list[Path]:
    """Write the demo corpus as JSONL files.

    Args:
        out_dir: the folder to write into (created).
        max_bytes: stop each file once it holds this many bytes (a deterministic prefix); the
            full corpus when ``None``.

    Returns:
        The written files, in corpus order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, documents in (
        ("pydoc_topics.jsonl", _topic_documents()),
        ("stdlib_docstrings.jsonl", _docstring_documents()),
    ):
        path = out / name
        size = count = 0
        with open(path, "w", encoding="utf-8", newline="\n") as stream:
            for doc in documents:
                line = json.dumps(doc, ensure_ascii=False) + "\n"
                stream.write(line)
                size += len(line.encode("utf-8"))
                count += 1
                if max_bytes is not None and size >= max_bytes:
                    break
        logger.info("demo corpus: %s (%d documents, %.2f MB)", path, count, size / 1e6)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m megatron_lomdm.data.demo_corpus OUT_DIR [--max-bytes N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the JSONL files into")
    parser.add_argument("--max-bytes", type=int, default=None, help="cap per file (a prefix)")
    args = parser.parse_args(argv)
    write_demo_corpus(args.out_dir, max_bytes=args.max_bytes)


if __name__ == "__main__":
    main()
