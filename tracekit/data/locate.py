"""Where dataset files are looked for, and the (opt-in) download of the public copies.

Search order: the path the user gives (a file, or a folder holding the file), the folder
in $TRACEKIT_DATA, ``../shared/data`` next to the repository (and next to the working
directory), and the download cache (``data/`` in tracekit's cache root, $TRACEKIT_CACHE).
Nothing is fetched unless the caller asks (``download=True``, the recipes' ``--download``),
and a download is kept only if its content matches the digest pinned here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tracekit.cache import cache_dir as cache_root
from tracekit.errors import TracekitError

ROME_DATA_URL = "https://rome.baulab.info/data/dsets"


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    filenames: tuple[str, ...]  # accepted file names, the first is the canonical one
    url: str | None  # public copy; None where there is no stable direct link
    where_to_get: str
    # What the public copy must hash to: ("sha256", hex) or, where only the file's git blob id
    # is published, ("git-blob", sha1 hex of b"blob <size>\0" + content).
    digest: tuple[str, str] | None = None


DATASETS = {
    # sha256 of the 45,108,470-byte release (its Git LFS pointer in scalable-model-editing/rebuilding-rome)
    "counterfact": DatasetFiles("counterfact", ("counterfact.json",), f"{ROME_DATA_URL}/counterfact.json",
                                "ROME's release (rome.baulab.info)",
                                ("sha256", "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f")),
    # sha256 of ROME's committed copy (git blob 6c711e97)
    "known_1000": DatasetFiles("known_1000", ("known_1000.json",), f"{ROME_DATA_URL}/known_1000.json",
                               "ROME's release (rome.baulab.info)",
                               ("sha256", "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a")),
    # ROME's copy of the MEND zsRE evaluation slice; some mirrors call it zsre_mem_eval.json.
    "zsre": DatasetFiles("zsre", ("zsre_mend_eval.json", "zsre_mem_eval.json"),
                         f"{ROME_DATA_URL}/zsre_mend_eval.json", "ROME's release (rome.baulab.info)",
                         ("git-blob", "8546c90abc10b77ebc9fd69de178cf7837ff86dc")),
    "counterfact-easyedit": DatasetFiles("counterfact-easyedit", ("counterfact-edit.json",), None,
                                         "EasyEdit's data release (data/counterfact/counterfact-edit.json)"),
}
ALIASES = {"knowns": "known_1000", "known": "known_1000", "cf": "counterfact", "easyedit": "counterfact-easyedit"}


def dataset_files(name: str) -> DatasetFiles:
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise TracekitError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Where downloads go: ``data/`` under tracekit's one cache root."""
    return cache_root() / "data"


def file_digest(path: Path, kind: str) -> str:
    """sha256 of a file, or its git blob id (``kind="git-blob"``)."""
    if kind == "sha256":
        digest = hashlib.sha256()
    elif kind == "git-blob":
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        raise ValueError(f"unknown digest kind {kind!r}")
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def search_folders(path: str | os.PathLike | None = None) -> list[Path]:
    folders: list[Path] = []
    if path is not None:
        folders.append(Path(path).expanduser())
    if os.environ.get("TRACEKIT_DATA"):
        folders.append(Path(os.environ["TRACEKIT_DATA"]).expanduser())
    folders += [repo_root().parent / "shared" / "data", Path.cwd().parent / "shared" / "data", cache_dir()]
    unique: list[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def find_data_file(name: str, path: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The file holding dataset ``name``; with ``download``, fetch the public copy if none is found."""
    spec = dataset_files(name)
    if path is not None and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    looked: list[str] = []
    for folder in search_folders(path):
        for filename in spec.filenames:
            candidate = folder / filename
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    if download:
        target = (Path(path).expanduser() if path is not None and not Path(path).suffix else
                  Path(os.environ["TRACEKIT_DATA"]) if os.environ.get("TRACEKIT_DATA") else cache_dir())
        return download_dataset(name, target)
    how = (f"pass --download to fetch it from {spec.url}" if spec.url else f"get it from {spec.where_to_get}")
    raise TracekitError(f"no {spec.name} file found; looked at {', '.join(looked)}; give its path "
                        f"(--data PATH), set TRACEKIT_DATA to its folder, or {how}")


def download_dataset(name: str, folder: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch the public copy of ``name`` into ``folder`` (atomically: no half-written file is left)."""
    spec = dataset_files(name)
    if spec.url is None:
        raise TracekitError(f"{spec.name} has no direct download; get it from {spec.where_to_get} and pass its path")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") and os.environ.get("TRACEKIT_ALLOW_DOWNLOAD") != "1":
        raise TracekitError(f"offline (HF_HUB_OFFLINE is set): download {spec.url} elsewhere and pass its path")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / spec.filenames[0]
    part = folder / (spec.filenames[0] + ".part")
    if spec.digest is None:
        raise TracekitError(f"{spec.name} has no pinned digest to check a download against; get it from "
                            f"{spec.where_to_get} and pass its path")
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        kind, expected = spec.digest
        found = file_digest(part, kind)
        if found != expected:
            part.unlink(missing_ok=True)
            raise TracekitError(f"the download of {spec.url} does not match its pinned {kind} ({found[:12]}... "
                                f"instead of {expected[:12]}...); it was not kept: fetch the original elsewhere "
                                "and pass its path")
        os.replace(part, destination)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        raise TracekitError(f"could not download {spec.url} ({err}); fetch it elsewhere and pass its path") from None
    return destination
