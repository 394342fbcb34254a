"""Corpus readers: every input format becomes one stream of `Paper` records.

Readers are generators over files of any size (`.gz` too). Each yields either a `Paper` or a
`Reject` (file, line, reason); `read_corpus` applies the error policy, drops duplicate titles and
keeps the books so that read == kept + duplicates + rejected always holds.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

FORMATS = ("seed", "jsonl", "arxiv", "csv")
_WS = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
# Lone surrogates are what `errors="surrogateescape"` turns undecodable bytes into; finding one in
# a field pins a non-UTF-8 record to its line instead of failing the whole file.
_SURROGATE = re.compile("[\udc80-\udcff]")
_SEED_HEADER_LINES = 2
_SEED_GLUE = "Subscribe"


@dataclass(frozen=True, slots=True)
class Paper:
    id: str
    title: str
    abstract: str
    categories: tuple[str, ...] = ()
    source: str = ""
    line: int = 0

    @property
    def text(self) -> str:
        """What models read: title and abstract, separated so the title stays a sentence."""
        return f"{self.title}. {self.abstract}"


@dataclass(frozen=True, slots=True)
class Reject:
    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


class CorpusError(ValueError):
    """Bad input, with the file and line that caused it in the message."""

    def __init__(self, source: str, line: int, reason: str):
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


@dataclass
class CorpusStats:
    read: int = 0
    kept: int = 0
    duplicates: int = 0
    rejected: int = 0
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"read {self.read} = kept {self.kept} + duplicates {self.duplicates} "
            f"+ rejected {self.rejected}"
        )


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def title_key(title: str) -> str:
    """Duplicate key: case, punctuation and spacing do not make two papers different."""
    return _NON_ALNUM.sub(" ", title.lower()).strip()


def open_text(path: str | Path) -> IO[str]:
    """Open a text file, `.gz` or `-` (stdin) with undecodable bytes kept as lone surrogates."""
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="")
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def detect_format(path: str | Path) -> str:
    name = str(path).removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".txt"):
        return "seed"
    raise CorpusError(str(path), 0, f"cannot tell the format from the file name; set format to one of {FORMATS}")


def _make_paper(
    source: str, line: int, pid: Any, title: Any, abstract: Any, categories: Iterable[str], max_chars: int
) -> Paper | Reject:
    fields = {"title": title, "abstract": abstract}
    for name, value in fields.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            return Reject(source, line, f"missing or empty {name}")
        if not isinstance(value, str):
            return Reject(source, line, f"{name} is {type(value).__name__}, expected a string")
        if _SURROGATE.search(value):
            return Reject(source, line, f"{name} is not valid UTF-8")
        if len(value) > max_chars:
            return Reject(source, line, f"{name} has {len(value)} characters, over the limit of {max_chars}")
    return Paper(
        id=str(pid),
        title=normalize_ws(title),
        abstract=normalize_ws(abstract),
        categories=tuple(c for c in categories if c),
        source=source,
        line=line,
    )


def read_seed_dump(path: str | Path, *, id_prefix: str = "seed", max_chars: int = 20_000,
                   max_title_chars: int = 400) -> Iterator[Paper | Reject]:
    """The paper-listing page dump: two header lines, `Subscribe` glued to the first title, then
    title line / abstract line pairs. Structural faults shift every later pair, so they always
    raise, whatever the error policy."""
    source = str(path)
    with open_text(path) as f:
        lines = [(i, ln.rstrip("\r\n")) for i, ln in enumerate(f, start=1)]
    body = [(i, ln) for i, ln in lines[_SEED_HEADER_LINES:] if ln.strip()]
    if len(lines) <= _SEED_HEADER_LINES or not body:
        raise CorpusError(source, len(lines), "no papers after the two header lines")
    first_line, first = body[0]
    if not first.startswith(_SEED_GLUE):
        raise CorpusError(source, first_line, f"expected the first title to start with {_SEED_GLUE!r}")
    body[0] = (first_line, first[len(_SEED_GLUE):])
    if len(body) % 2:
        raise CorpusError(source, body[-1][0], "unpaired trailing line: a title with no abstract line")
    for k in range(0, len(body), 2):
        (tline, title), (_, abstract) = body[k], body[k + 1]
        if len(title) > max_title_chars:
            raise CorpusError(
                source, tline,
                f"expected a title but found {len(title)} characters: a title or abstract line is missing above",
            )
        yield _make_paper(source, tline, f"{id_prefix}-{k // 2:03d}", title, abstract, (), max_chars)


def read_jsonl(path: str | Path, *, id_prefix: str = "jsonl", max_chars: int = 20_000,
               fields: Mapping[str, str] | None = None) -> Iterator[Paper | Reject]:
    """JSON lines: `title`, `abstract`, optional `id` and `categories` (a list, or a space-separated
    string as in the arXiv metadata snapshot)."""
    source = str(path)
    names = {"id": "id", "title": "title", "abstract": "abstract", "categories": "categories", **(fields or {})}
    with open_text(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if _SURROGATE.search(raw):
                yield Reject(source, lineno, "line is not valid UTF-8")
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                yield Reject(source, lineno, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(rec, dict):
                yield Reject(source, lineno, f"expected a JSON object, got {type(rec).__name__}")
                continue
            cats = rec.get(names["categories"]) or ()
            if isinstance(cats, str):
                cats = cats.split()
            pid = rec.get(names["id"]) or f"{id_prefix}-{lineno:06d}"
            yield _make_paper(source, lineno, pid, rec.get(names["title"]), rec.get(names["abstract"]), cats, max_chars)


def _parse_categories(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = ast.literal_eval(value)
        return [str(c) for c in parsed]
    return value.replace(",", " ").split()


def read_csv(path: str | Path, *, id_prefix: str = "csv", max_chars: int = 20_000,
             fields: Mapping[str, str] | None = None) -> Iterator[Paper | Reject]:
    """CSV with configurable column names; categories may be a Python-list string."""
    source = str(path)
    names = {"id": "id", "title": "title", "abstract": "abstract", "categories": "categories", **(fields or {})}
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(source, 1, "empty CSV file: no header row") from None
        col = {h: i for i, h in enumerate(header)}
        missing = [names[k] for k in ("title", "abstract") if names[k] not in col]
        if missing:
            raise CorpusError(source, 1, f"CSV header lacks column(s) {missing}; it has {header}")
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield Reject(source, start, f"row has {len(row)} fields, header has {len(header)}")
                continue
            get = lambda key: row[col[names[key]]] if names[key] in col else None  # noqa: E731
            try:
                cats = _parse_categories(get("categories") or "")
            except (ValueError, SyntaxError):
                yield Reject(source, start, f"unparseable categories {get('categories')!r}")
                continue
            pid = get("id") or f"{id_prefix}-{start:06d}"
            yield _make_paper(source, start, pid, get("title"), get("abstract"), cats, max_chars)


_READERS = {"seed": read_seed_dump, "jsonl": read_jsonl, "arxiv": read_jsonl, "csv": read_csv}


def read_source(path: str | Path, fmt: str | None = None, **options: Any) -> Iterator[Paper | Reject]:
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise CorpusError(str(path), 0, f"unknown format {fmt!r}; expected one of {FORMATS}")
    if str(path) != "-" and not Path(path).is_file():
        raise CorpusError(str(path), 0, "no such file")
    return _READERS[fmt](path, **options)


def read_corpus(
    sources: Mapping[str, Mapping[str, Any]],
    *,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    dedupe: bool = True,
    max_chars: int = 20_000,
    stats: CorpusStats | None = None,
) -> Iterator[Paper]:
    """Stream the papers of every configured source in order.

    `sources` maps a source name to {path, format?, id_prefix?, fields?}.
    With on_error="skip", rejects are appended to `rejects_path` as JSON lines.
    Pass a `CorpusStats` to read the accounting once the stream is exhausted.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else CorpusStats()
    seen: set[bytes] = set()
    rejects_file = None
    try:
        for name, spec in sources.items():
            spec = dict(spec)
            path = spec.pop("path")
            fmt = spec.pop("format", None)
            spec.setdefault("id_prefix", name)
            spec["max_chars"] = max_chars
            per = stats.per_source.setdefault(name, {"read": 0, "kept": 0, "duplicates": 0, "rejected": 0})
            for item in read_source(path, fmt, **{k: v for k, v in spec.items() if v is not None}):
                stats.read += 1
                per["read"] += 1
                if isinstance(item, Reject):
                    if on_error == "raise":
                        raise CorpusError(item.source, item.line, item.reason)
                    stats.rejected += 1
                    per["rejected"] += 1
                    if rejects_path is not None:
                        if rejects_file is None:
                            rejects_file = open(rejects_path, "a", encoding="utf-8")
                        rejects_file.write(json.dumps(asdict(item)) + "\n")
                    continue
                if dedupe:
                    key = hashlib.blake2b(title_key(item.title).encode(), digest_size=8).digest()
                    if key in seen:
                        stats.duplicates += 1
                        per["duplicates"] += 1
                        continue
                    seen.add(key)
                stats.kept += 1
                per["kept"] += 1
                yield item
    finally:
        if rejects_file is not None:
            rejects_file.close()


def read_gold(path: str | Path, known_tags: Iterable[str]) -> dict[str, list[str]]:
    """Gold dev labels: {paper id: [tag ids]}. Unknown tags are an error, not a silent miss."""
    known = set(known_tags)
    gold: dict[str, list[str]] = {}
    with open_text(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                pid, tags = rec["id"], rec["tags"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorpusError(str(path), lineno, f"expected {{id, tags}}: {e}") from None
            unknown = sorted(set(tags) - known)
            if unknown:
                raise CorpusError(str(path), lineno, f"unknown tag(s) {unknown}")
            gold[pid] = list(tags)
    return gold
