"""Reading text from the user's files: ``.txt``, ``.md``, ``.jsonl``/``.json``, ``.parquet``, ``.html``,
folders and globs of them, streamed one document at a time so corpora larger than memory work.

What counts as one document:
- ``.txt`` / ``.md`` / ``.html``: the whole file;
- ``.jsonl``: one row, its ``text_field`` (default ``text``);
- ``.json``: a list of rows (or ``{"data": [...]}``), each row's ``text_field``;
- ``.parquet``: one row of the ``text_field`` column, read in record batches.

Structured rows (``.jsonl``/``.jsonl.gz``, ``.json``, ``.parquet``) come from one streaming reader,
:func:`iter_file_rows` / :func:`iter_rows`, which the SFT, preference and eval-data loaders use as well.

Bad input is a :class:`~lmstack.errors.DataError` naming the file (missing, not UTF-8, no text field, empty).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmstack.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".text")
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".parquet")


def expand_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Files named directly, found in folders (recursively, by known suffix) and matched by globs, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        s = str(p)
        if any(ch in s for ch in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"{s}: the pattern matches no file")
            for m in matches:
                if Path(m).is_file():
                    files.append(Path(m))
            continue
        path = Path(s)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{path}: the folder holds no {'/'.join(SUFFIXES)} file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); convert it, e.g. iconv -t UTF-8") from None


def row_suffix(path: Path) -> str | None:
    """The structured-row format of ``path`` (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``) or None."""
    name = path.name.lower()
    return next((suf for suf in ROW_SUFFIXES if name.endswith(suf)), None)


def iter_file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of one structured file, streamed: a JSONL line (gzip allowed), an item of a
    JSON list (or of ``{"data": [...]}``), a Parquet row read in record batches. ``where`` names the row for
    error messages (``file:line``, ``file[i]``, ``file row i``)."""
    suffix = row_suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if suffix == ".jsonl.gz" else open
        try:
            with opener(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        yield f"{path}:{lineno}", json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except (OSError, EOFError) as e:  # a truncated or non-gzip .gz file
            raise DataError(f"{path}: cannot read ({e})") from None
    elif suffix == ".json":
        try:
            data = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
    elif suffix == ".parquet":
        from lmstack.extras import require

        pq = require("pyarrow.parquet", "reading Parquet files")

        try:
            pf = pq.ParquetFile(path)
            i = 0
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield f"{path} row {i}", row
                    i += 1
        except DataError:
            raise
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from None
    else:
        raise DataError(f"{path}: not a row file (use {', '.join(ROW_SUFFIXES)})")


def iter_rows(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of the structured files under ``paths`` (files, folders, globs)."""
    for path in expand_paths(paths):
        yield from iter_file_rows(path)


def iter_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file (see the module docstring for what a document is)."""
    suffix = row_suffix(path)
    if suffix == ".parquet":  # only the text column is read
        from lmstack.extras import require

        pq = require("pyarrow.parquet", "reading Parquet files")

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from None
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            f"set the text field")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield str(value)
    elif suffix is not None:
        for where, row in iter_file_rows(path):
            yield _field(row, text_field, where)
    else:
        yield read_text_file(path)


def _field(row: object, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        raise DataError(f"{where}: row has no {text_field!r} field")
    value = row[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def iter_documents(paths: Iterable[str | os.PathLike] | str | os.PathLike, text_field: str = "text",
                   skip_empty: bool = True) -> Iterator[str]:
    """Stream documents from all files under ``paths``; raise DataError if nothing but empty text is found."""
    files = expand_paths(paths)
    any_text = False
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        for doc in iter_file_documents(path, text_field):
            if skip_empty and not doc.strip():
                continue
            any_text = True
            yield doc
    if not any_text:
        raise DataError(f"{', '.join(map(str, files))}: no text found")
