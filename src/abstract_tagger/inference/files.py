"""The batch-prediction job: stream a file of abstracts through a `Tagger`, chunk by chunk.

A chunk is a fixed run of `chunk_size` input records (rejects included), so chunk k holds the same
records on every machine: `shard=I/N` tags the chunks with k % N == I. Each finished chunk is
appended to `<output>.partial` and then logged in `<output>.journal` with the byte offsets it ends
at, so a killed run resumes exactly after its last whole chunk; the partial file is renamed to
`<output>` only when the input is exhausted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from omegaconf import DictConfig

from abstract_tagger.checkpoint.format import MARKER_FILES
from abstract_tagger.common.config import ConfigError, one_of, plain, require
from abstract_tagger.common.files import exclusive, file_digest, lock_path, write_atomic
from abstract_tagger.common.progress import progress_bar
from abstract_tagger.data.corpus import FORMATS, CorpusError, CorpusReadError, Paper, Reject, batched, read_source
from abstract_tagger.inference.options import (
    GRAPH_BACKENDS,
    PREDICT_OPTIONS,
    check_predict_options,
    choose_backend,
    predict_defaults,
)
from abstract_tagger.inference.tagger import Tagger

log = logging.getLogger(__name__)
_SCORE_DECIMALS = 4


@dataclass
class PredictStats:
    read: int = 0
    tagged: int = 0
    rejected: int = 0

    def add(self, other: PredictStats) -> None:
        self.read += other.read
        self.tagged += other.tagged
        self.rejected += other.rejected

    def summary(self) -> str:
        return f"read {self.read} = tagged {self.tagged} + rejected {self.rejected}"


def parse_shard(spec: str | None) -> tuple[int, int]:
    """"I/N" -> (I, N); None -> the whole input."""
    if spec is None or str(spec).strip() == "":
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", str(spec).strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {spec!r}")
    return int(match[1]), int(match[2])


def check_shard(shard: Any) -> None:
    """The API's (I, N), checked as predict.py's "I/N" is: shard (2, 2) would tag nothing."""
    ok = (isinstance(shard, tuple | list) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
          and 0 <= shard[0] < shard[1])
    if not ok:
        raise ConfigError(f"shard={shard!r}: must be (I, N) with 0 <= I < N")


class OutputFiles:
    """Everything a run writes next to its output."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.partial, self.rejects, self.rejects_partial, self.journal = (
            self.output.with_name(self.output.name + suffix)
            for suffix in (".partial", ".rejects.jsonl", ".rejects.jsonl.partial", ".journal")
        )
        self.lock = lock_path(self.output)

    def part(self, index: int, count: int) -> OutputFiles:
        """One process's share of a multi-process run; keeps the extension that picks the row format."""
        return OutputFiles(self.output.with_name(f"{self.output.stem}.part{index}-of-{count}{self.output.suffix}"))

    def finalize(self, rejected: int) -> None:
        # An earlier run's rejects file goes before the new output appears: beside it, they would be
        # mistaken for this run's. A kill between the renames below leaves the new output without its
        # rejects (still in the .partial file), never beside the old ones.
        self.rejects.unlink(missing_ok=True)
        os.replace(self.partial, self.output)
        if rejected:
            os.replace(self.rejects_partial, self.rejects)
        else:
            self.rejects_partial.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def remove_partials(self) -> None:
        for path in (self.partial, self.rejects_partial, self.journal):
            path.unlink(missing_ok=True)


class RowFormat:
    """Output rows: JSON lines {id, tags, scores}, or CSV (id, space-separated tags, one score column per tag)."""

    def __init__(self, labels: Sequence[str], csv_output: bool):
        self.labels = list(labels)
        self.csv = csv_output

    @classmethod
    def for_path(cls, path: Path, labels: Sequence[str]) -> RowFormat:
        return cls(labels, csv_output=path.suffix.lower() == ".csv")

    def _csv(self, rows: Iterable[Sequence[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue().encode("utf-8", "surrogateescape")

    def header(self) -> bytes:
        return self._csv([["id", "tags", *self.labels]]) if self.csv else b""

    def rows(self, ids: Sequence[str], tags: Sequence[list[str]], scores: np.ndarray) -> bytes:
        # Rounded in float64: float32 0.0601 prints as 0.060100000351667404.
        rounded = np.round(scores.astype(np.float64), _SCORE_DECIMALS).tolist()
        if self.csv:
            return self._csv([pid, " ".join(t), *row] for pid, t, row in zip(ids, tags, rounded))
        return "".join(
            json.dumps({"id": pid, "tags": t, "scores": dict(zip(self.labels, row))}, ensure_ascii=False) + "\n"
            for pid, t, row in zip(ids, tags, rounded)
        ).encode("utf-8", "surrogateescape")


def _weights_digest(tagger: Tagger) -> str:
    """Fingerprint of what decides the scores (weights, thresholds, rule blend), so a resumed run never
    mixes rows of two models."""
    h = hashlib.sha256()
    tagger.backend.fingerprint(h)
    h.update(tagger.thresholds.tobytes())
    if tagger.blend is not None:  # rules.json: its weight and table change the scores too
        h.update(json.dumps(tagger.blend.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(settings, finished chunks). A line cut short by a kill is the last one and is dropped."""
    if not path.is_file():
        return None, []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    if not lines:
        return None, []
    return lines[0], lines[1:]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _intact_chunks(files: OutputFiles, header: bytes, done: list[dict[str, Any]]) -> int:
    """How many of the journalled chunks the partial files still hold byte for byte. A kill only ever
    cuts after the last journalled chunk, but a full disk, a failing one or an interrupted copy can cut
    a file short (or leave zeros) anywhere: each chunk's bytes are checked against the digests the
    journal recorded for them."""
    try:
        with open(files.partial, "rb") as out, open(files.rejects_partial, "rb") as rejects:
            if out.read(len(header)) != header:
                return 0
            for n, entry in enumerate(done):
                for f, key in ((out, "output"), (rejects, "rejects")):
                    size = entry[f"{key}_end"] - f.tell()
                    if size < 0 or _sha256(f.read(size)) != entry.get(f"{key}_sha256"):
                        return n
    except FileNotFoundError:
        return 0
    return len(done)


class _OpenFiles:
    """The open files of one run: the partial output, the partial rejects and the journal."""

    def __init__(self, files: OutputFiles, rows: RowFormat, settings: dict[str, Any], resume: bool):
        files.output.parent.mkdir(parents=True, exist_ok=True)
        done = self._resumable(files, rows, settings) if resume else []
        self.done = len(done)
        last = done[-1] if done else {}
        self.stats = PredictStats(**{k: last.get(k, 0) for k in ("read", "tagged", "rejected")})
        # Bytes after the last intact chunk belong to a chunk cut short by a kill: cut them off (the
        # files were checked to hold at least that much, so this never pads).
        self.out = self._open(files.partial, last.get("output_end"), rows.header())
        self.rejects = self._open(files.rejects_partial, last.get("rejects_end"), b"")
        # Rewritten whole: entries of chunks found damaged must go.
        write_atomic(files.journal, lambda f: f.write(
            "".join(json.dumps(line) + "\n" for line in (settings, *done)).encode("utf-8")))
        self.journal = open(files.journal, "a", encoding="utf-8")

    @staticmethod
    def _resumable(files: OutputFiles, rows: RowFormat, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """The journal entries of the partial run that this run can continue, intact ones only."""
        saved, done = _read_journal(files.journal)
        if saved is None:
            log.info("resume: no partial run of %s found, starting from the beginning", files.output)
            return []
        if saved != settings:
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            raise ValueError(
                f"cannot resume {files.output}: the partial run used different {', '.join(changed)}; "
                "rerun without resume=true"
            )
        intact = _intact_chunks(files, rows.header(), done)
        if intact < len(done):
            log.warning("%s: cut short or damaged from its chunk %d of %d on (a disk or copy failure; a kill "
                        "never does this): resuming after the %d intact chunk(s)", files.partial, intact + 1,
                        len(done), intact)
        return done[:intact]

    @staticmethod
    def _open(path: Path, end: int | None, header: bytes) -> BinaryIO:
        if end is None:
            f = open(path, "wb")
            f.write(header)
            return f
        f = open(path, "r+b")
        f.truncate(end)
        f.seek(end)
        return f

    def commit(self, rows: bytes, rejects: Sequence[Reject], chunk: int, tagged: int) -> None:
        reject_lines = "".join(r.to_json() + "\n" for r in rejects).encode("utf-8", "surrogateescape")
        self.out.write(rows)
        self.rejects.write(reject_lines)
        self.out.flush()
        self.rejects.flush()
        self.stats.add(PredictStats(read=tagged + len(rejects), tagged=tagged, rejected=len(rejects)))
        entry = {"chunk": chunk, **asdict(self.stats),
                 "output_end": self.out.tell(), "rejects_end": self.rejects.tell(),
                 "output_sha256": _sha256(rows), "rejects_sha256": _sha256(reject_lines)}
        self.journal.write(json.dumps(entry) + "\n")
        self.journal.flush()

    def close(self, raising: bool = True) -> None:
        """Close all three (a second call does nothing); with raising=False a failed flush is not raised."""
        errors = []
        for f in (self.out, self.rejects, self.journal):
            try:
                f.close()
            except OSError as e:
                errors.append(e)
        if errors and raising:
            raise errors[0]


@dataclass(frozen=True)
class FileJob:
    """How `predict_file` reads, tags and writes: predict.py's file options. max_chars, chunk_size and
    on_error left None take the package's defaults (inference/predict_defaults.yaml). With
    finalize=False the partial files and journal stay for `merge_parts`."""

    format: str | None = None
    fields: Mapping[str, str] | None = None
    max_chars: int | None = None
    chunk_size: int | None = None
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    on_error: str | None = None
    top_k: int | None = None
    threshold: float | None = None
    progress: bool = True
    finalize: bool = True

    def resolved(self) -> FileJob:
        """Defaults filled in, every value checked (ConfigError naming the first bad one)."""
        defaults = predict_defaults()
        job = replace(self, **{k: defaults[k] for k in ("max_chars", "chunk_size", "on_error")
                               if getattr(self, k) is None})
        check_predict_options({k: getattr(job, k) for k in ("max_chars", "chunk_size", "on_error", "top_k",
                                                            "threshold")})
        check_shard(job.shard)
        return job

    def settings(self, tagger: Tagger, input: str | Path, rows: RowFormat) -> dict[str, Any]:
        """What a resumed run must share with the partial run it continues."""
        return {
            "input": str(input), "format": self.format, "chunk_size": self.chunk_size, "shard": list(self.shard),
            "csv": rows.csv, "labels": tagger.labels, "top_k": self.top_k, "threshold": self.threshold,
            "max_chars": self.max_chars, "fields": dict(self.fields) if self.fields else None,
            # The engine and precision move the written scores (int8 and bf16 differ in the 4th decimal).
            "scoring": tagger.backend.scoring(),
            # Contents, not names: a file replaced at the same path, or another checkpoint, must not be
            # resumed into. Stdin cannot be fingerprinted before it is read.
            "input_content": None if str(input) == "-" else file_digest(input),
            "checkpoint_weights": _weights_digest(tagger),
        }


def _tag_chunks(tagger: Tagger, records: Iterable[Paper | Reject], run: _OpenFiles, rows: RowFormat,
                job: FileJob) -> None:
    """Tag this shard's chunks that the partial run has not finished, committing each as it is done."""
    index, count = job.shard
    bar = progress_bar(unit="abstract", unit_scale=True, disable=not job.progress, initial=run.stats.read)
    try:
        for k, chunk in enumerate(batched(records, job.chunk_size)):
            if k % count != index or k // count < run.done:
                continue
            papers = [r for r in chunk if isinstance(r, Paper)]
            rejects = [r for r in chunk if isinstance(r, Reject)]
            if rejects and job.on_error == "raise":
                first = rejects[0]
                raise CorpusError(first.source, first.line, first.reason)
            scores = tagger.scores(papers, threshold=job.threshold)
            tags = tagger.decide(scores, top_k=job.top_k, threshold=job.threshold)
            run.commit(rows.rows([p.id for p in papers], tags, scores), rejects, k, len(papers))
            bar.update(len(chunk))
    finally:
        bar.close()


def predict_file(tagger: Tagger, input: str | Path, output: str | Path, **options: Any) -> PredictStats:
    """Tag every paper of `input` into `output` (JSON lines, or CSV for a `.csv` name), in input order;
    `options` are FileJob's.

    Every input record ends up as an output row or, with on_error="skip", a line of
    `<output>.rejects.jsonl`; on_error="raise" stops at the first bad record with file:line: reason.
    """
    job = FileJob(**options).resolved()
    check_output(input, output)
    files = OutputFiles(Path(output))
    rows = RowFormat.for_path(files.output, tagger.labels)
    # Stdin has no name to guess a format from; JSON lines is the pipe-friendly one.
    fmt = job.format or ("jsonl" if str(input) == "-" else None)
    records = read_source(input, fmt, max_chars=job.max_chars, **({"fields": dict(job.fields)} if job.fields else {}))
    with exclusive(files.output):
        run = _OpenFiles(files, rows, job.settings(tagger, input, rows), job.resume)
        try:
            _tag_chunks(tagger, records, run, rows, job)
        except Exception as e:
            run.close(raising=False)  # a full disk fails the flush again: the first error is the one to tell
            if not run.stats.read or (isinstance(e, CorpusError) and not isinstance(e, CorpusReadError)):
                # A bad record stops every run of this input at the same place, and a corrected input is
                # never resumed into (its digest is in the journal): the partial files would serve nothing.
                files.remove_partials()
            else:
                # Anything else (a full disk, an input the disk could not read, a graph file gone) may
                # not happen again: the whole chunks stay, as after a kill, for resume=true.
                log.error("%s: stopped with %d records read in whole chunks (%s); resume=true continues "
                          "after them", files.output, run.stats.read, files.partial)
            raise
        finally:
            run.close()
        if job.finalize:
            files.finalize(run.stats.rejected)
    if not run.stats.read and job.shard[0] == 0:
        log.warning("%s: no records (empty input); %s is empty", input, files.output)
    return run.stats


def merge_parts(output: str | Path, count: int) -> PredictStats:
    """Interleave the chunks of `count` unfinalized shard runs back into input order in `output`."""
    files = OutputFiles(Path(output))
    parts = [files.part(i, count) for i in range(count)]
    read = [_read_journal(p.journal) for p in parts]
    journals = [done for _, done in read]
    rows = RowFormat(read[0][0]["labels"], csv_output=read[0][0]["csv"])
    stats = PredictStats()
    for done in journals:
        if done:
            stats.add(PredictStats(**{key: done[-1][key] for key in ("read", "tagged", "rejected")}))
    with exclusive(files.output):
        with open(files.partial, "wb") as out, open(files.rejects_partial, "wb") as rejects:
            out.write(rows.header())
            _interleave(parts, journals, out, rejects, len(rows.header()))
        files.finalize(stats.rejected)
    for part in parts:
        part.remove_partials()
    return stats


def _interleave(parts: list[OutputFiles], journals: list[list[dict[str, Any]]], out: BinaryIO, rejects: BinaryIO,
                header: int) -> None:
    """Chunk k of the input is chunk k // count of part k % count: copy them in that order."""
    count = len(parts)
    sources = [(open(p.partial, "rb"), open(p.rejects_partial, "rb")) for p in parts]
    cursors = [[header, 0] for _ in parts]
    try:
        k = 0
        while k // count < len(journals[k % count]):
            part = k % count
            entry = journals[part][k // count]
            (out_src, rej_src), cursor = sources[part], cursors[part]
            out_src.seek(cursor[0])
            out.write(out_src.read(entry["output_end"] - cursor[0]))
            rej_src.seek(cursor[1])
            rejects.write(rej_src.read(entry["rejects_end"] - cursor[1]))
            cursor[:] = entry["output_end"], entry["rejects_end"]
            k += 1
    finally:
        for pair in sources:
            for f in pair:
                f.close()


@dataclass
class _OneProcess:
    """The process state of a single-process run, where accelerate (and torch) are not loaded."""

    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True
    is_local_main_process: bool = True


def _launched_processes() -> int:
    """Processes started together by `accelerate launch` / `torchrun` (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def predict_from_config(cfg: Any) -> PredictStats:
    """The `predict.py` job; under `accelerate launch` each process tags every N-th chunk and the main
    process merges the parts in input order (torch backend: the processes meet through torch.distributed)."""
    validate_predict(cfg)
    backend = choose_backend(cfg.backend, cfg.checkpoint, precision=cfg.precision)
    if backend in GRAPH_BACKENDS and _launched_processes() > 1:
        if cfg.backend in GRAPH_BACKENDS:
            raise ValueError(f"backend={cfg.backend} runs in one process: split the input with shard=I/N across "
                             "separate runs, or use backend=torch under accelerate launch")
        backend = "torch"
    if backend == "torch":
        import torch
        from accelerate import PartialState

        # Without cpu=True, accelerate treats CPU processes started by torchrun or mpirun as one.
        state = PartialState(cpu=not torch.cuda.is_available())
    else:
        state = _OneProcess()
    output = Path(cfg.output)
    shard, target = parse_shard(cfg.shard), output
    multi = state.num_processes > 1
    if multi:
        if cfg.shard or str(cfg.input) == "-":
            raise ValueError("under accelerate launch the processes split the input themselves: "
                             "give a file input and no shard=")
        shard, target = (state.process_index, state.num_processes), OutputFiles(output).part(
            state.process_index, state.num_processes).output
    tagger = Tagger.from_pretrained(cfg.checkpoint, backend=backend, device=None if backend in GRAPH_BACKENDS else state.device,
                                    precision=cfg.precision, batch_size=cfg.batch_size,
                                    recheck_margin=cfg.recheck_margin, num_threads=cfg.num_threads)
    log.info("checkpoint %s: %s, shard %d/%d", cfg.checkpoint, tagger.backend.describe(), *shard)
    stats = predict_file(
        tagger, cfg.input, target, format=cfg.format, fields=cfg.fields, max_chars=cfg.max_chars,
        chunk_size=cfg.chunk_size, shard=shard, resume=cfg.resume, on_error=cfg.on_error, top_k=cfg.top_k,
        threshold=cfg.threshold, progress=cfg.progress and state.is_local_main_process, finalize=not multi)
    if multi:
        state.wait_for_everyone()
        if not state.is_main_process:
            return stats
        stats = merge_parts(output, state.num_processes)
    log.info("%s -> %s", stats.summary(), output)
    if stats.rejected:
        log.info("rejected records (file, line, reason): %s", OutputFiles(output).rejects)
    return stats


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def validate_predict(cfg: DictConfig) -> None:
    """predict.py: every setting, before the model loads and before anything is written."""
    check_predict_options({key: plain(cfg[key]) for key in PREDICT_OPTIONS})
    one_of(cfg, "format", (None, *FORMATS))
    for key in ("resume", "progress"):
        one_of(cfg, key, (True, False))
    try:
        parse_shard(cfg.shard)
    except ValueError as e:
        raise ConfigError(f"shard={cfg.shard!r}: {e}") from None
    require(cfg.fields is None or (isinstance(cfg.fields, DictConfig) and all(isinstance(v, str) for v in
             cfg.fields.values())), "fields", "must be a mapping like {title: COLUMN, abstract: COLUMN}", cfg.fields)
    source = str(cfg.input)
    require(source == "-" or Path(source).is_file(), "input", "file not found (or not a file)", source)
    check_output(source, cfg.output)


def check_output(source: str | Path, output: str | Path) -> None:
    """predict.py's and predict_file's output: a new file that destroys nothing (the input, a checkpoint)."""
    output, source = Path(str(output)), str(source)
    require(not output.is_dir(), "output", "is a directory; give a file name", str(output))
    # Rows are appended and truncated by byte offset to resume; a compressed stream cannot be.
    require(output.suffix.lower() != ".gz", "output", "compressed output is not supported; write a .jsonl "
             "or .csv and compress it afterwards", str(output))
    # Its thresholds.json or config.json would be overwritten, or a stray file published with it.
    require(not all((output.parent / name).is_file() for name in MARKER_FILES), "output",
            f"is inside the checkpoint directory {output.parent}; write it elsewhere", str(output))
    if source != "-":
        files = OutputFiles(output)
        for path in (files.output, files.partial, files.rejects, files.rejects_partial, files.journal, files.lock):
            require(not _same_file(path, Path(source)), "output", f"would overwrite the input {source}", str(output))
