"""Corpus readers: every input format becomes one stream of `Paper` records.

Readers are generators over files of any size (`.gz` and stdin too). Each yields either a `Paper`
or a `Reject` (file, line, reason); `read_corpus` applies the error policy, drops duplicate titles
and keeps the books so that read == kept + duplicates + rejected always holds.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import logging
import re
import sys
import unicodedata
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("seed", "jsonl", "arxiv", "csv")
FIELDS = ("id", "title", "abstract", "categories")
SOURCE_KEYS = ("path", "format", "fields", "id_prefix")
_WS = re.compile(r"\s+")
_NON_WORD = re.compile(r"[\W_]+")
# Lone surrogates come from undecodable bytes (`errors="surrogateescape"`) or from JSON `\udXXX`
# escapes; either way the text cannot be encoded again, so the record is rejected at its line.
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
_SEED_HEADER_LINES = 2
_SEED_GLUE = "Subscribe"
# Seed titles are at most ~160 characters and abstracts at least ~550: a longer "title" means the
# title/abstract pairing has slipped.
_SEED_MAX_TITLE_CHARS = 400
# ... and a shorter "abstract" is a title: a line is doubled (or missing) above, which an even number
# of such faults would otherwise hide by pairing the lines up again.
_SEED_MIN_ABSTRACT_CHARS = 200
# What a truncated or corrupt `.gz`, or a failing disk, raises mid-stream.
_READ_ERRORS = (OSError, EOFError, zlib.error)


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

    def to_json(self) -> str:
        return json.dumps({"file": self.source, "line": self.line, "reason": self.reason})


class CorpusError(ValueError):
    """Bad input, with the file and line that caused it in the message."""

    def __init__(self, source: str, line: int, reason: str):
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


class CorpusReadError(CorpusError):
    """The file could not be read at that line (a truncated `.gz`, an I/O error): not a bad record."""


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


def _json_error(e: json.JSONDecodeError) -> str:
    # Some messages end in " at" ("Unterminated string starting at"), which would read "at at column".
    return f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}"


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def title_key(title: str) -> str:
    """Duplicate key: case, punctuation, spacing and Unicode forms do not make two papers different.
    Letters of every script count, so titles without Latin letters do not all collide."""
    key = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", title).casefold()).strip()
    return key or title


class _TitleDigests:
    """The titles seen so far, for dropping duplicates from streams of millions of papers.

    A Python set of digests costs ~80 bytes a title (object header + hash table); this open-addressing
    table of 64-bit blake2b digests, linear probing, kept 1/4 to 1/2 full, costs 16-32 bytes a title.
    Two different titles share a digest with probability ~n^2 / 2^65 over the whole stream:
    ~3e-8 for 1M titles, ~2e-7 for the 2.7M-paper arXiv snapshot; such a pair would be counted as a
    duplicate. Digest 0 marks an empty slot, so a title hashing to 0 is stored as 1.
    """

    def __init__(self, log2_slots: int = 16):
        self._slots = array("Q", [0]) * (1 << log2_slots)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: str) -> bool:
        """Remember `key`; False if it was already there."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()) or 1
        if not self._insert(self._slots, digest):
            return False
        self._count += 1
        if 2 * self._count > len(self._slots):
            old, self._slots = self._slots, array("Q", [0]) * (2 * len(self._slots))
            for d in old:
                if d:
                    self._insert(self._slots, d)
        return True

    @staticmethod
    def _insert(slots: array, digest: int) -> bool:
        mask = len(slots) - 1
        i = digest & mask
        while (held := slots[i]) != 0:
            if held == digest:
                return False
            i = (i + 1) & mask
        slots[i] = digest
        return True


def open_text(path: str | Path, newline: str = "\n") -> IO[str]:
    """Open a text file, `.gz` or `-` (stdin) with undecodable bytes kept as lone surrogates, so a
    bad byte fails its own record rather than the whole file. A leading BOM is dropped. Only `\n`
    ends a line, as in editors and `wc -l` (the csv module needs `newline=""`, where a lone `\r` ends
    one too)."""
    options = {"encoding": "utf-8-sig", "errors": "surrogateescape", "newline": newline}
    if str(path) == "-":
        return io.TextIOWrapper(sys.stdin.buffer, **options)
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", **options)
    return open(path, **options)


@contextmanager
def _open_binary(path: str | Path) -> Iterator[IO[bytes]]:
    if str(path) == "-":
        yield sys.stdin.buffer  # not ours to close
    elif str(path).endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


class _Lines:
    """The lines of `f`, numbered as editors and `wc -l` number them: a lone `\r` that splits a line
    for the csv module does not start a new one. A read failure (say, a truncated `.gz`) names the
    line it stopped at."""

    def __init__(self, source: str, f: Iterable[Any]):
        self.source, self.f = source, f
        self.next_line = 1  # the line the next piece starts on

    def __iter__(self) -> Iterator[Any]:
        try:
            for piece in self.f:
                self.next_line += piece[-1:] in ("\n", b"\n")
                yield piece
        except _READ_ERRORS as e:
            raise CorpusReadError(self.source, self.next_line, f"cannot read the file: {e}") from e


def detect_format(path: str | Path) -> str:
    name = str(path).removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".txt"):
        return "seed"
    raise CorpusError(str(path), 0, f"cannot tell the format from the file name; set format to one of {FORMATS}")


def _field_names(fields: Mapping[str, str] | None) -> dict[str, str]:
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in fields; expected some of {FIELDS}")
    return {**{name: name for name in FIELDS}, **(fields or {})}


def _make_paper(source: str, line: int, record: Mapping[str, Any], max_chars: int | None, id_prefix: str,
                abstract_line: int | None = None) -> Paper | Reject:
    """A Paper from `record`'s id, title, abstract and categories (each may be missing), or the Reject
    naming what is wrong. `abstract_line`: where the abstract is, when not on the record's first line
    (the seed dump)."""
    pid, title, abstract, categories = (record.get(name) for name in FIELDS)
    texts = {}
    for name, value, at in (("title", title, line), ("abstract", abstract, abstract_line or line)):
        if value is None:
            return Reject(source, at, f"missing {name}")
        if not isinstance(value, str):
            return Reject(source, at, f"{name} is {type(value).__name__}, expected a string")
        value = normalize_ws(value)
        if not value:
            return Reject(source, at, f"empty {name}")
        if max_chars is not None and len(value) > max_chars:
            return Reject(source, at, f"{name} has {len(value)} characters, over the limit of {max_chars}")
        if _SURROGATE.search(value):
            return Reject(source, at, f"{name} is not valid UTF-8")
        if not any(c.isalpha() for c in value):
            # Emoji, digits or zero-width characters only: perhaps a real paper, but worth a look.
            log.warning("%s:%d: %s has no letters (%r); kept", source, at, name, value[:80])
        texts[name] = value
    if categories is None:
        categories = ()
    elif isinstance(categories, str):
        categories = categories.split()
    elif not (isinstance(categories, list | tuple) and all(isinstance(c, str) for c in categories)):
        return Reject(source, line, "categories must be a list of strings or a space-separated string")
    if any(_SURROGATE.search(c) for c in categories):
        return Reject(source, line, "categories are not valid UTF-8")
    if pid is None or pid == "":
        pid = f"{id_prefix}-{line:06d}"
    elif isinstance(pid, bool) or not isinstance(pid, str | int):
        return Reject(source, line, f"id is {type(pid).__name__}, expected a string")
    elif isinstance(pid, str) and _SURROGATE.search(pid):
        # The id is written back into every output row, which cannot hold it: reject here, at its line,
        # rather than fail the whole run when the row is written.
        return Reject(source, line, "id is not valid UTF-8")
    return Paper(
        id=str(pid).strip(),
        title=texts["title"],
        abstract=texts["abstract"],
        categories=tuple(c.strip() for c in categories if c.strip()),
        source=source,
        line=line,
    )


def read_seed_dump(path: str | Path, *, id_prefix: str = "seed", max_chars: int | None = None,
                   max_title_chars: int = _SEED_MAX_TITLE_CHARS,
                   min_abstract_chars: int = _SEED_MIN_ABSTRACT_CHARS) -> Iterator[Paper | Reject]:
    """The paper-listing page dump: two header lines, `Subscribe` glued to the first title, then
    title line / abstract line pairs; ids `{id_prefix}-000`... in page order. Structural faults shift
    every later pair, so they always raise, whatever the error policy. A web-page dump is small, so
    it is read whole to check its structure before yielding anything."""
    source = str(path)
    with open_text(path) as f:
        lines = [(i, ln.rstrip("\r\n")) for i, ln in enumerate(_Lines(source, f), start=1)]
    body = [(i, ln) for i, ln in lines[_SEED_HEADER_LINES:] if ln.strip()]
    if not body:
        raise CorpusError(source, len(lines), "no papers after the two header lines")
    first_line, first = body[0]
    if not first.startswith(_SEED_GLUE) or not first[len(_SEED_GLUE):].strip():
        raise CorpusError(source, first_line, f"expected the first title glued to {_SEED_GLUE!r}, got {first[:80]!r}")
    body[0] = (first_line, first[len(_SEED_GLUE):])
    for (tline, title) in body[::2]:
        if len(title) > max_title_chars:
            raise CorpusError(
                source, tline,
                f"expected a title but found {len(title)} characters: a title or abstract line is missing above",
            )
    for (aline, abstract) in body[1::2]:
        if len(abstract.strip()) < min_abstract_chars:
            raise CorpusError(
                source, aline,
                f"expected an abstract but found {len(abstract.strip())} characters: a title line is repeated "
                "or an abstract line is missing above",
            )
    if len(body) % 2:
        raise CorpusError(source, body[-1][0], "unpaired trailing line: a title with no abstract line")
    for k in range(0, len(body), 2):
        (tline, title), (aline, abstract) = body[k], body[k + 1]
        record = {"id": f"{id_prefix}-{k // 2:03d}", "title": title, "abstract": abstract}
        yield _make_paper(source, tline, record, max_chars, id_prefix, abstract_line=aline)


def read_jsonl(path: str | Path, *, id_prefix: str = "jsonl", max_chars: int | None = None,
               fields: Mapping[str, str] | None = None) -> Iterator[Paper | Reject]:
    """JSON lines: `title`, `abstract`, optional `id` and `categories` (a list, or a space-separated
    string as in the arXiv metadata snapshot). Lines are read as bytes and decoded one by one, so a
    bad byte rejects its own line and only `\\n` ends a line."""
    source = str(path)
    names = _field_names(fields)
    quoted = [json.dumps(name).encode() for name in names.values()]
    with _open_binary(path) as f:
        for lineno, raw in enumerate(_Lines(source, f), start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Reject(source, lineno, f"not valid UTF-8 (byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield Reject(source, lineno, _json_error(e))
                continue
            except RecursionError:
                yield Reject(source, lineno, "malformed JSON: nested too deeply")
                continue
            if not isinstance(rec, dict):
                yield Reject(source, lineno, f"expected a JSON object, got {type(rec).__name__}")
                continue
            # A key written twice keeps its last value silently. Counting the quoted key in the raw line
            # (a quote inside a string is escaped) keeps the slower check to the rare lines that may.
            if any(raw.count(key) > 1 for key in quoted):
                repeated = _repeated_keys(raw.decode("utf-8"), names.values())
                if repeated:
                    yield Reject(source, lineno, f"key(s) {repeated} given more than once")
                    continue
            yield _make_paper(source, lineno, {name: rec.get(key) for name, key in names.items()}, max_chars,
                              id_prefix)


def _repeated_keys(text: str, used: Iterable[str]) -> list[str]:
    """The keys of `used` that the JSON object `text` gives more than once (at its top level: the hook
    sees nested objects first, the whole record last)."""
    objects: list[list[str]] = []
    json.loads(text, object_pairs_hook=lambda pairs: objects.append([k for k, _ in pairs]) or dict(pairs))
    keys = objects[-1]
    return sorted({k for k in used if keys.count(k) > 1})


def _parse_categories(value: str) -> Any:
    """`['cs.LG', 'stat.ML']` (a Python list written out, as in arxiv_ml_sample.csv), or separated
    by spaces or commas."""
    value = value.strip()
    if value.startswith("["):
        return ast.literal_eval(value)
    return value.replace(",", " ").split()


# The csv module's default field size limit: a field longer than this stops the run as malformed (it
# is how an unclosed quote is caught before it swallows the rest of a big file).
_CSV_FIELD_LIMIT = 131_072


def _csv_rows(reader: Iterator[list[str]], max_chars: int | None) -> Iterator[list[str]]:
    """`reader`'s rows, with the field size limit raised to what `max_chars` keeps (a valid longer field
    stopped the run). Whitespace is collapsed after reading, so a raw field may be longer than its
    text: 4x leaves room. The limit is process-wide, so it is set for each row and put back."""
    limit = max(_CSV_FIELD_LIMIT, 4 * max_chars) if max_chars else _CSV_FIELD_LIMIT
    while True:
        before = csv.field_size_limit(limit)
        try:
            row = next(reader)
        except StopIteration:
            return
        finally:
            csv.field_size_limit(before)
        yield row


def _columns(source: str, header: list[str], names: Mapping[str, str]) -> dict[str, int]:
    """{column name: index} of the header; a column this reader uses must be there exactly once."""
    col = {h.strip(): i for i, h in enumerate(header)}
    missing = [names[k] for k in ("title", "abstract") if names[k] not in col]
    if missing:
        raise CorpusError(source, 1, f"CSV header lacks column(s) {missing}; it has {header}")
    stripped = [h.strip() for h in header]
    repeated = sorted({name for name in names.values() if stripped.count(name) > 1})
    if repeated:
        # Which copy holds the text is a guess: the last one won, silently.
        raise CorpusError(source, 1, f"CSV header repeats column(s) {repeated}; keep one of each")
    return col


def read_csv(path: str | Path, *, id_prefix: str = "csv", max_chars: int | None = None,
             fields: Mapping[str, str] | None = None) -> Iterator[Paper | Reject]:
    """CSV with a header row and configurable column names (`fields` maps id/title/abstract/
    categories to columns). Quoted fields may span lines; a record's line is where it starts."""
    source = str(path)
    names = _field_names(fields)
    with open_text(path, newline="") as f:
        lines = _Lines(source, f)
        # strict: a quote left open runs to the end of the file, which without it is one silent field
        # swallowing every later record; with it, the end of data inside quotes is an error.
        reader = _csv_rows(csv.reader(lines, strict=True), max_chars)
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(source, 1, "empty CSV file: no header row") from None
        except csv.Error as e:
            raise CorpusError(source, 1, f"malformed CSV header: {e}") from None
        col = _columns(source, header, names)
        while True:
            start = lines.next_line  # the reader reads no further ahead than the record it returns
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                # The parser has lost its place (say, an unbalanced quote ran past the field size
                # limit): what follows cannot be trusted, so this stops the run in every mode.
                raise CorpusError(source, start, f"malformed CSV: {e} (a quote opened in this record is "
                                                 "never closed?)") from None
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield Reject(source, start, f"row has {len(row)} fields, header has {len(header)}")
                continue
            values = {key: row[col[name]] if name in col else None for key, name in names.items()}
            try:
                values["categories"] = _parse_categories(values["categories"] or "")
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                yield Reject(source, start, f"unparseable categories {values['categories'][:80]!r}")
                continue
            yield _make_paper(source, start, values, max_chars, id_prefix)


_READERS = {"seed": read_seed_dump, "jsonl": read_jsonl, "arxiv": read_jsonl, "csv": read_csv}


def read_source(path: str | Path, fmt: str | None = None, **options: Any) -> Iterator[Paper | Reject]:
    """One file (or `-` for stdin) as a stream of `Paper` and `Reject`; `fmt` defaults to a guess
    from the file name."""
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise CorpusError(str(path), 0, f"unknown format {fmt!r}; expected one of {FORMATS}")
    if str(path) != "-" and not Path(path).exists():
        raise CorpusError(str(path), 0, "no such file")
    if str(path) != "-" and Path(path).is_dir():
        raise CorpusError(str(path), 0, "is a directory, expected a file")
    return _READERS[fmt](path, **options)


def read_corpus(
    sources: Mapping[str, Mapping[str, Any]],
    *,
    on_error: str = "raise",
    rejects_path: str | Path | None = None,
    dedupe: bool = True,
    max_chars: int | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[Paper]:
    """Stream the papers of every configured source in order.

    `sources` maps a source name to {path, format?, id_prefix?, fields?}; ids default to
    `{name}-{line}` where a record has none. With on_error="skip", each bad record becomes a line
    {file, line, reason} of `rejects_path` (rewritten on each call), or a logged warning without one.
    Pass a `CorpusStats` to read the accounting once the stream is exhausted. `max_chars`: the longest
    title or abstract kept (the entry points pass `data.max_chars`); None: no limit.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    for name, spec in sources.items():
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown or "path" not in spec:
            raise ValueError(f"data.sources.{name}: needs 'path', may have {SOURCE_KEYS}; unknown keys {unknown}")
    stats = stats if stats is not None else CorpusStats()
    seen = _TitleDigests()
    rejects_file = open(rejects_path, "w", encoding="utf-8") if on_error == "skip" and rejects_path else None
    try:
        for name, spec in sources.items():
            options = {k: v for k, v in spec.items() if k not in ("path", "format") and v is not None}
            options.setdefault("id_prefix", name)
            per = stats.per_source.setdefault(name, {"read": 0, "kept": 0, "duplicates": 0, "rejected": 0})
            for item in read_source(spec["path"], spec.get("format"), max_chars=max_chars, **options):
                stats.read += 1
                per["read"] += 1
                if isinstance(item, Reject):
                    if on_error == "raise":
                        raise CorpusError(item.source, item.line, item.reason)
                    stats.rejected += 1
                    per["rejected"] += 1
                    if rejects_file is not None:
                        rejects_file.write(item.to_json() + "\n")
                    else:
                        log.warning("skipped %s", item)
                    continue
                if dedupe and not seen.add(title_key(item.title)):
                    stats.duplicates += 1
                    per["duplicates"] += 1
                    continue
                stats.kept += 1
                per["kept"] += 1
                yield item
            log.info("%s: read %d = kept %d + duplicates %d + rejected %d",
                     name, per["read"], per["kept"], per["duplicates"], per["rejected"])
    finally:
        if rejects_file is not None:
            rejects_file.close()


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items from a stream (the last may be shorter)."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


@dataclass(frozen=True)
class GoldSet:
    """A hand-labelled set: {paper id: tags} in file order, with each row's title and line, so that
    labels are joined to the corpus by id and checked by title (a reordered or edited corpus would
    otherwise attach labels to the wrong papers without a word)."""

    path: str
    tags: dict[str, list[str]]
    titles: dict[str, str | None]
    lines: dict[str, int]

    def __len__(self) -> int:
        return len(self.tags)

    def labels(self, tag_ids: Sequence[str]) -> np.ndarray:
        """0/1 matrix [papers, tags] in file order."""
        return np.array([[t in tags for t in tag_ids] for tags in self.tags.values()], dtype=np.int8).reshape(
            len(self.tags), len(tag_ids))

    def rows(self, papers: Sequence[Paper]) -> np.ndarray:
        """Row indices of this set's papers in `papers`, in file order. A paper missing from the corpus,
        or whose corpus title differs from the gold title, is an error naming the gold line."""
        index = {p.id: i for i, p in enumerate(papers)}
        out = []
        for pid in self.tags:
            if pid not in index:
                raise CorpusError(self.path, self.lines[pid], f"{pid}: not in the corpus")
            title = self.titles[pid]
            if title is not None and title_key(title) != title_key(papers[index[pid]].title):
                raise CorpusError(self.path, self.lines[pid], f"{pid}: gold title {title!r} does not match the "
                                  f"corpus paper's {papers[index[pid]].title!r}")
            out.append(index[pid])
        return np.array(out, dtype=np.int64)


def read_gold(path: str | Path, known_tags: Iterable[str]) -> GoldSet:
    """A gold file: JSON lines {id, tags, title (optional, checked against the corpus)}. Unknown tags or a
    repeated id are an error, not a silent miss."""
    known = set(known_tags)
    source = str(path)
    tags_by_id: dict[str, list[str]] = {}
    titles: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    with open_text(path) as f:
        for lineno, raw in enumerate(_Lines(source, f), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CorpusError(source, lineno, _json_error(e)) from None
            pid = rec.get("id") if isinstance(rec, dict) else None
            tags = rec.get("tags") if isinstance(rec, dict) else None
            if not isinstance(pid, str) or not pid or _SURROGATE.search(pid):
                raise CorpusError(source, lineno, "expected an object with a string 'id' and a list 'tags'")
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise CorpusError(source, lineno, f"{pid}: 'tags' must be a list of tag ids")
            unknown = sorted(set(tags) - known)
            if unknown:
                raise CorpusError(source, lineno, f"{pid}: unknown tag(s) {unknown}")
            if pid in tags_by_id:
                raise CorpusError(source, lineno, f"{pid}: listed twice")
            title = rec.get("title")
            if title is not None and not isinstance(title, str):
                raise CorpusError(source, lineno, f"{pid}: 'title' must be a string")
            tags_by_id[pid], titles[pid], lines[pid] = list(tags), title, lineno
    return GoldSet(source, tags_by_id, titles, lines)


def gold_train_files(spec: str | Path | Mapping[str, str | None] | None) -> dict[str, str]:
    """`data.gold_train` as {name: file}: one file (named `gold_train`), or {name: file or null}, where
    null drops a set (`data.gold_train.older=null`) and `+data.gold_train.NAME=FILE` adds one."""
    if not spec:
        return {}
    if isinstance(spec, (str, Path)):
        return {"gold_train": str(spec)}
    return {name: str(path) for name, path in spec.items() if path}


def read_gold_train(spec: str | Path | Mapping[str, str | None] | None, known_tags: Iterable[str]) -> list[GoldSet]:
    """The hand-labelled training sets of `data.gold_train`; a paper in two of them is an error naming the
    second file's line (which labels would it train on?)."""
    return list(read_gold_sets({"train": gold_train_files(spec)}, known_tags)["train"].values())


def read_gold_sets(spec: Mapping[str, Mapping[str, str | None] | None],
                   known_tags: Iterable[str]) -> dict[str, dict[str, GoldSet]]:
    """`data.gold` ({split: {name: path or null}}) read: {split: {name: GoldSet}}, null sets dropped.
    A paper in two sets is an error: its scores would count twice and a test paper could tune."""
    known = list(known_tags)
    sets = {split: {name: read_gold(path, known) for name, path in (named or {}).items() if path}
            for split, named in spec.items()}
    seen: dict[str, str] = {}
    for split, named in sets.items():
        for name, gold in named.items():
            for pid in gold.tags:
                if pid in seen:
                    raise CorpusError(gold.path, gold.lines[pid], f"{pid}: also in gold set {seen[pid]}")
                seen[pid] = f"{split}/{name}"
    return sets
