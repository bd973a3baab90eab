"""Files of a run directory: atomic writes, checked reads, the manifest.

Writes go to a temporary file in the same folder and are renamed into place, so an interrupted
stage never leaves a half-written file under a final name, and never clobbers what was there.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from probes.errors import CtdInputError, input_error
from probes.files import file_sha256

__all__ = [
    "RunLock",
    "check_run_name",
    "atomic_path",
    "write_parquet",
    "read_parquet",
    "write_json",
    "read_json",
    "Manifest",
    "file_sha256",
    "output_files",
    "package_versions",
]

_TRACKED_PACKAGES = (
    "characterize-then-distill",
    "torch",
    "transformers",
    "transformer-lens",
    "tokenizers",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "simple-icd-10-cm",
    "sentence-transformers",
    "ruptures",
    "plotly",
)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; results are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(frame: pd.DataFrame, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``frame`` to ``path`` atomically; ``metadata`` goes into the schema's key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet(
    path: str | Path, required: Iterable[str] = (), with_metadata: bool = False
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, str]]:
    """Read a parquet file, naming the file in any error (missing, unreadable, lacking columns)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found", "run the stage that writes it first, or check the path")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise input_error(path, f"not a readable parquet file ({type(exc).__name__})", "rewrite it by rerunning its stage") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise input_error(path, f"missing column(s) {missing}", f"the file needs columns {list(required)}")
    frame = table.to_pandas()
    if with_metadata:
        raw = table.schema.metadata or {}
        return frame, {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"pandas")}
    return frame


def write_json(obj: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found", "check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise input_error(path, f"malformed JSON ({exc.msg})", "fix or delete the file", exc.lineno) from None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunLock:
    """One process per run directory: ``<run>/.ctd.lock`` holds the owner's pid and host.

    The lock file appears complete or not at all (the record is written to a temporary file and
    hard-linked into place), so a lock that exists always names a live or a dead owner. A lock left
    by a process that no longer runs (a kill, a crash) is taken over; a live one, or one that cannot
    be read, is refused with a message that names it.
    """

    _settle_seconds = 2.0  # how long an empty or partial lock (an older ctd writing it) is re-read

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".ctd.lock"
        self._held = False

    def _owner_alive(self, info: dict) -> bool:
        if info.get("host") != platform.node():
            return True  # another machine: cannot tell, so respect it
        try:
            os.kill(int(info.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
        return True

    def _read_owner(self) -> dict | None:
        """The lock's owner record; ``{}`` if the lock is gone, ``None`` if it stays empty or
        unparsable for ``_settle_seconds`` (an older ctd created it and writes it next)."""
        deadline = time.monotonic() + self._settle_seconds
        while True:
            try:
                info = json.loads(self.path.read_text())
                if isinstance(info, dict):
                    return info
            except FileNotFoundError:
                return {}
            except (OSError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def _create(self, me: dict) -> bool:
        """Create the lock with ``me`` in it; ``False`` if it exists. ``os.link`` is atomic and never
        replaces a file, so nobody can see the lock before its record is complete."""
        # Not named .*.tmp: the lock's holder deletes those, and this file is a contender's, not its own.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
        try:
            with open(tmp, "x") as fh:
                json.dump(me, fh)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links on this filesystem: exclusive create below
        finally:
            tmp.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _remove_stale(self, info: dict) -> None:
        """Delete the lock if it still holds the stale record ``info``. Under the guard, so that of
        two processes that judged it stale, the second does not delete the lock the first took."""
        import fcntl  # POSIX only, like the pid check

        with open(self.path.with_name(f"{self.path.name}.guard"), "a") as guard:  # never deleted
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when closed
            try:
                current = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                return
            if current == info:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Processes of one torchrun job share the lock (each rank works on its own share of the run).
        group = os.environ.get("TORCHELASTIC_RUN_ID") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        me = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "group": group}
        for _ in range(5):
            if self._create(me):
                self._held = True
                # Temporary files of a killed writer are never read (atomic renames); with the lock
                # held no other ctd process writes here, so they can go.
                for leftover in self.path.parent.rglob(".*.tmp"):
                    leftover.unlink(missing_ok=True)
                return self
            info = self._read_owner()
            if info == {}:  # released meanwhile: try again
                continue
            if info is None:  # not written by this protocol (an older ctd, a hand edit): never take it
                raise input_error(self.path, "the run lock is empty or unreadable", "delete the lock file if no ctd process is running")
            if info.get("pid") == os.getpid() and info.get("host") == platform.node():
                return self  # re-entered by the same process
            if group is not None and info.get("group") == group:
                return self  # another rank of the same torchrun job
            if self._owner_alive(info):
                raise input_error(self.path.parent, f"another ctd process (pid {info.get('pid')}, since {info.get('started')}) is using this run directory", "wait for it to finish or choose another --out") from None
            self._remove_stale(info)  # its owner is gone
        raise input_error(self.path, "could not take the run lock", "delete the lock file if no ctd process is running")

    def __exit__(self, *exc) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def check_run_name(out: str | Path, root: str | Path = "results") -> Path:
    """A relative run directory must stay inside ``results/`` (names like ``../x`` are refused)."""
    out = Path(out)
    if out.is_absolute():
        return out
    base = Path(root).resolve()
    resolved = (Path.cwd() / out).resolve()
    if resolved != base and base not in resolved.parents:
        raise input_error(out, "run directory escapes results/", "name the run results/NAME (or pass an absolute path)")
    return out


# Activation shards carry their own checksums (activations/shards.json, verified by the store on
# every read), so the manifest hashes the store's listing and index instead of every shard again.
_SELF_CHECKED = ("activations/shard-", "activations/rank-")


def output_files(run_dir: Path, outputs: Iterable[str]) -> list[str]:
    """The files (relative paths) behind a stage's declared outputs; ``name/`` means the whole folder."""
    files: list[str] = []
    for entry in outputs:
        path = run_dir / entry
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                rel = child.relative_to(run_dir).as_posix()
                if not rel.startswith(_SELF_CHECKED):
                    files.append(rel)
        elif path.is_file():
            files.append(path.relative_to(run_dir).as_posix())
    return files


class Manifest:
    """``results/<run>/manifest.json``: resolved config, versions, seeds, git commit and stage timings.

    Each stage records itself with :meth:`stage`; the file is rewritten atomically after every
    change so an interrupted run still says what it finished. The status ``complete`` is written
    last, after the stage's outputs, together with the sha256 of every output file: a stage
    without it is never read as finished, and :meth:`verify` refuses outputs edited since.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"
        if self.path.exists():
            self.data = read_json(self.path)
            if not isinstance(self.data, dict):
                raise input_error(self.path, "manifest is not a JSON object", "delete it and rerun")
        else:
            self.data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}
        self.data.setdefault("stages", {})
        self.data["versions"] = package_versions()
        self.data["git_commit"] = _git_commit()
        self.data["platform"] = platform.platform()

    @classmethod
    def for_stage(cls, run_dir: str | Path, manifest: "Manifest | None" = None) -> "Manifest":
        """The manifest a stage records itself in: ``manifest`` when ``ctd run`` passes its own
        (it verified every finished stage at its start), else the run's, verified now."""
        if manifest is not None:
            return manifest
        manifest = cls(run_dir)
        manifest.verify_complete()
        return manifest

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.data, self.path)

    @contextmanager
    def stage(self, name: str, config: dict[str, Any] | None = None, seed: int | None = None) -> Iterator[dict]:
        """Time a stage; on success mark it complete with its config, seed and outputs."""
        record: dict[str, Any] = {"config": config or {}, "seed": seed, "status": "running"}
        self.data["stages"][name] = record
        self.save()
        start = time.perf_counter()
        try:
            yield record
        except BaseException as exc:
            record["status"] = "failed"
            record["error"] = str(exc) if isinstance(exc, CtdInputError) else type(exc).__name__
            record["seconds"] = round(time.perf_counter() - start, 3)
            self.save()
            raise
        record["sha256"] = {rel: file_sha256(self.run_dir / rel) for rel in output_files(self.run_dir, record.get("outputs", []))}
        record["status"] = "complete"
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.save()

    def verify(self, name: str) -> None:
        """Check a finished stage's output files against the hashes recorded when it finished."""
        record = self.data["stages"].get(name, {})
        for rel, expected in record.get("sha256", {}).items():
            path = self.run_dir / rel
            if not path.is_file():
                raise input_error(path, f"output of stage {name!r} is missing", f"rerun the stage (delete {self.run_dir} to start over)")
            if file_sha256(path) != expected:
                raise input_error(path, f"changed since stage {name!r} wrote it (sha256 differs from manifest.json)", "restore the file or rerun the stage into a new --out; results are never read from edited files")

    def verify_complete(self, skip: Iterable[str] = ()) -> None:
        """:meth:`verify` every finished stage (done before any stage reads earlier outputs);
        ``skip`` names a stage about to be redone, whose old outputs will be replaced."""
        for name, record in self.data["stages"].items():
            if record.get("status") == "complete" and name not in skip:
                self.verify(name)
    def model_path(self) -> str:
        """The model folder recorded by the traces stage (every later stage reads the same model)."""
        path = self.data.get("model", {}).get("path")
        if not path:
            raise input_error(self.path, "no model recorded for this run", "run `ctd traces --out DIR` first")
        return path

    def is_complete(self, name: str) -> bool:
        return self.data["stages"].get(name, {}).get("status") == "complete"
