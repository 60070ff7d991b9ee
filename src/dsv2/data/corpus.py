"""Documents for tokenizer training and tokenisation.

A corpus is a list of paths: text files (one document each), folders (every text-like file
under them, sorted, so runs are reproducible), and `.jsonl` files (one document per line,
from its `text` field). With no paths the default corpus is the standard library sources
of the running interpreter: real text that needs no download.

Files that cannot be read or are not UTF-8 are reported (`Skipped`) and skipped whole,
never truncated or decoded with replacement characters, so a bad file cannot quietly
corrupt the token stream.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml"}


@dataclass
class Skipped:
    """Files left out of a corpus, and why (shown to the user, written to the data card)."""
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path, why: str) -> None:
        self.items.append((str(path), why))

    def report(self, limit: int = 5) -> str:
        if not self.items:
            return ""
        lines = [f"skipped {len(self.items)} file(s) or line(s):"]
        lines += [f"  {p}: {why}" for p, why in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more (listed in card.json)")
        return "\n".join(lines)


def add_corpus_arguments(p) -> None:
    """The arguments every corpus-reading verb takes: paths, --out, --max-mb."""
    p.add_argument("paths", nargs="*", help="text files, folders, or .jsonl files with a 'text' field "
                                            "(default: this Python's standard library sources)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, default=None, help="read at most this many MB of text")


# Left out of the default corpus: test suites and their fixtures, and machine-written tables
# (codec maps, HTML entities, locale aliases, Unicode case and stringprep data, build-time
# config dumps, pydoc's topic dump). They are a third of the stdlib's bytes but not the Python
# people write, and a small model spends its few steps copying them.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "dist-packages"}
EXCLUDED_FILES = {"html/entities.py", "locale.py", "stringprep.py", "re/_casefix.py", "_compat_pickle.py"}


def default_corpus() -> list[Path]:
    """The hand-written `.py` sources of this interpreter's standard library: no tests,
    generated tables or site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if _hand_written(p.relative_to(root)))


def _hand_written(rel: Path) -> bool:
    return (not EXCLUDED_DIRS & set(rel.parts[:-1]) and rel.as_posix() not in EXCLUDED_FILES
            and not rel.name.startswith("_sysconfigdata"))


def expand(paths: list[str | Path] | None) -> list[Path]:
    """Paths -> the sorted list of files they name; raises on a path that does not exist."""
    if not paths:
        return default_corpus()
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist: give text files, folders or .jsonl files.")
    return files


def select(files: list[Path], max_bytes: int | None) -> list[Path]:
    """Every k-th file so that about `max_bytes` remain, spread over the whole corpus (a prefix
    of the sorted list would be one corner of it, e.g. only `asyncio`)."""
    if max_bytes is None:
        return files
    total = sum(f.stat().st_size for f in files)
    k = max(1, -(-total // max(1, max_bytes)))
    return files[k // 2::k] or files[:1]


def iter_documents(paths: list[str | Path] | None = None, skipped: Skipped | None = None,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Yield each document's text; about `max_bytes` of it (files spread over the corpus) when given."""
    skipped = skipped if skipped is not None else Skipped()
    total = 0
    for f in select(expand(paths), max_bytes):
        try:
            raw = f.read_bytes()
        except OSError as e:
            skipped.add(f, f"unreadable ({e.strerror or e})")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.add(f, f"not UTF-8 (byte {e.start})")
            continue
        docs = _jsonl_texts(f, text, skipped) if f.suffix == ".jsonl" else [text]
        for doc in docs:
            if doc:
                yield doc
                total += len(doc)
                if max_bytes is not None and total >= max_bytes:
                    return


def _jsonl_texts(f: Path, text: str, skipped: Skipped) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped.add(f"{f}:{i}", "not valid JSON")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            skipped.add(f"{f}:{i}", "no string 'text' field")
            continue
        out.append(obj["text"])
    return out
