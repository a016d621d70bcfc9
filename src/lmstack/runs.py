"""Run directories, atomic writes, checkpoints and JSONL logs.

Layout of a run directory (every job writes into one)::

    RUN/
      config.json            the resolved config of the job
      model.safetensors      weights (+ model_config.json)
      tokenizer.json         the tokenizer
      metrics.jsonl          one JSON object per log step
      checkpoints/step_N/    model, optimizer, scheduler, RNG, data position (see save_checkpoint)
      report.md, report.html, *.png

Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the target, so a
crash never leaves a half-written file behind: readers see the old version or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lmstack.errors import DataError, LmstackError


def _umask() -> int:
    """The process umask (there is no call that reads it without setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, e: OSError) -> LmstackError:
    """An OSError while creating an output (read-only folder, a file where a folder belongs) as one line."""
    where = f" ({e.filename})" if e.filename and str(e.filename) not in (str(path), str(path.parent)) else ""
    reason = e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        reason = "a parent of this path is a file, not a folder"
    return LmstackError(f"{path}: cannot write here: {reason}{where}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Use it for writers that want a filename (``safetensors.torch.save_file``, ``torch.save``)::

        with atomic_path(run / "model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    if path.is_dir():
        raise LmstackError(f"{path}: is a folder; give a file path to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file with their own 0600 one:
        # a saved model must be as readable as any file the user's umask allows, so set the mode last
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line, atomically; ``rows`` may be a generator (streamed, never all in memory).
    Returns the number of rows written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    torch = sys.modules.get("torch")  # a torch dtype can only exist once torch is imported; never import it here
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or corrupt file is a user error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete.

    An existing directory at ``path`` is replaced only after the new one is fully written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmstackError(f"{path}: exists and is not a folder; give a folder path (or remove the file)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; honour the umask like mkdir does
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)  # writers such as safetensors create 0600 files whatever the umask
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def remove_if_failed(path: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """On an exception, remove the folder ``path`` if this call created it and ``keep(path)`` is false (e.g. it
    holds a checkpoint to resume from): a failed run leaves no half-made run folder behind."""
    path = Path(path)
    top = path  # the outermost folder this call creates (runs/ as well as runs/x when neither exists)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    created = not top.exists()
    try:
        yield path
    except BaseException:
        if created and top.is_dir() and not (keep is not None and path.is_dir() and keep(path)):
            shutil.rmtree(top, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step_N/{model.safetensors, optimizer.pt, state.json}


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep: tuple[Path, ...] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never deleting those in ``keep`` (e.g. best)."""
    ckpts = list_checkpoints(run_dir)
    keep_set = {Path(p).resolve() for p in keep}
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p.resolve() not in keep_set:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Logs and progress


class JsonlLogger:
    """Append one JSON object per line to ``metrics.jsonl`` (flushed per record, so a crash loses nothing)."""

    def __init__(self, path: str | os.PathLike, truncate: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w" if truncate else "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A progress line for long work: done/total, rate, ETA and any metrics you pass (loss, tok/s...).

    Renders with tqdm on a terminal; when stderr is not a terminal (CI, logs) it prints a plain line
    every ``print_every`` seconds instead, so logs stay readable.
    """

    def __init__(self, total: float | None, desc: str = "", unit: str = "it", print_every: float = 10.0,
                 disable: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0.0
        self.start = time.perf_counter()
        self._last_print = self.start
        self.print_every = print_every
        self.disable = disable
        self.metrics: dict[str, Any] = {}  # the latest value of each metric, shown on every line
        self._bar = None
        if not disable and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float:
        if not self.total or self.done <= 0:
            return float("nan")
        return self.elapsed / self.done * (self.total - self.done)

    def update(self, n: float = 1, **metrics: Any) -> None:
        self.done += n
        self.metrics.update(metrics)
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(n)
            if metrics:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.metrics.items()}, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_print >= self.print_every or (self.total and self.done >= self.total):
            self._last_print = now
            rate = self.done / max(self.elapsed, 1e-9)
            total = f"/{self.total:g}" if self.total else ""
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.metrics.items())
            print(f"{self.desc} {self.done:g}{total} {self.unit} | {rate:.1f} {self.unit}/s | "
                  f"eta {format_duration(self.eta())} {extra}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half an image) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
