"""Second-moment statistics of MLP keys: C = E[k k^T] at a layer, over a text corpus.

ROME and MEMIT whiten their updates by C (ROME: 100,000 Wikipedia samples). We stream:
each batch's keys are folded into a running sum of k k^T and dropped, so memory is one
d_mlp x d_mlp matrix whatever the corpus size. Only the blocks up to the highest
requested layer run (the rest cannot change the keys), and every requested layer is
gathered in the same pass.

The corpus is, in order: a text file the caller names (``.txt``/``.raw``: documents separated
by blank lines; ``.jsonl``: a "text" field per line), a corpus file in $TRACEKIT_DATA or
../shared/data (names in ``CORPUS_FILES``, WikiText's included), else the small public-domain
text shipped with tracekit (``SHIPPED_TEXT``: seconds to read, where sampling a corpus from the
model takes minutes; with a warning, since it is fiction, not Wikipedia). ``corpus="model"``
samples the text from the model itself instead (seeded, cached, grown by whole batches, with a
lock so that two processes never sample the same batches twice). Documents are tokenised,
concatenated and cut into samples of ``sample_tokens`` tokens. The metadata says which text
the statistics came from (``SecondMoment.source``).

Results are cached in safetensors with metadata (model identity, layer, samples, dtype, corpus,
and a sha256 of the matrix). A cached file whose metadata does not match what was asked, whose
bytes do not match their checksum, whose shape is not [d_mlp, d_mlp] or that holds NaN or inf is
recomputed with a warning; a file the caller names explicitly must pass the same checks, or it
is an error. Within a process, statistics read or computed for a model are kept in its memo
table (``tracekit.memo``), in host memory while their file is unchanged, so a sweep reads and checks each file once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tracekit.adapters import Site
from tracekit.cache import cache_dir, locked, slug, write_atomic
from tracekit.errors import TracekitError, check
from tracekit.identity import cache_identity, weight_fingerprint
from tracekit.memo import model_memo

if TYPE_CHECKING:  # for annotations only: no import cycle, no early torch
    from tracekit.models import Model

FORMAT_VERSION = "2"  # 2: sha256 of the matrix and the corpus source in the metadata
# Looked for, in this order, in each data folder ($TRACEKIT_DATA, ../shared/data, ...).
CORPUS_FILES = ("corpus.txt", "corpus.jsonl", "wikitext-103.txt", "wikitext.txt", "wikipedia.jsonl", "wikipedia.txt",
                "wikitext/wikitext-103-raw-v1.train.raw", "wikitext/wikitext-2-raw-v1.train.raw",
                "wikitext/wikitext-2-raw-v1.test.raw", "wikitext/wikitext-2-raw-v1.valid.raw")
SHIPPED_TEXT = Path(__file__).resolve().parents[1] / "data" / "text" / "sherlock_holmes_1-2.txt"
SHIPPED_DESCRIPTION = "the text shipped with tracekit (The Adventures of Sherlock Holmes, stories I-II, public domain)"
SELF_SAMPLED = "model"  # corpus= value: sample the text from the model itself
_LOADED = "second_moments"  # memo table: statistics already read (or computed) for a model
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SecondMoment:
    matrix: torch.Tensor  # E[k k^T], [d_mlp, d_mlp]
    layer: int
    metadata: dict[str, str]
    path: Path | None = None

    @property
    def tokens(self) -> int:
        return int(self.metadata["tokens"])

    @property
    def source(self) -> str:
        """Which text the statistics came from, in words."""
        return self.metadata.get("source", self.metadata.get("corpus", "?"))


# ---- the corpus -------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    key: str  # identifies the text for cache keys
    path: Path | None  # None: sampled from the model
    description: str


def resolve_corpus(corpus: str | os.PathLike | None) -> Corpus | None:
    """The user's file, else a corpus file in the data folders, else the shipped text;
    None for ``corpus="model"`` (self-sampled)."""
    if corpus == SELF_SAMPLED:
        return None
    if corpus is not None:
        path = Path(corpus).expanduser()
        check(path.is_file(), f"corpus file {path} does not exist; give a .txt or .jsonl file of text, "
                              f"or corpus={SELF_SAMPLED!r} to sample one from the model")
        return _file_corpus(path)
    from tracekit.data.locate import search_folders

    for folder in search_folders():
        for name in CORPUS_FILES:
            if (folder / name).is_file():
                return _file_corpus(folder / name)
    digest = hashlib.sha256(SHIPPED_TEXT.read_bytes()).hexdigest()[:12]
    return Corpus(f"shipped-{digest}", SHIPPED_TEXT, SHIPPED_DESCRIPTION)


def _file_corpus(path: Path) -> Corpus:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Corpus(f"file-{key}", path, str(path))


# WikiText's raw files escape in-word hyphens and number separators: "1 @,@ 000", "well @-@ known".
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def _read_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as lines:
            for i, line in enumerate(lines):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise TracekitError(f"{path} line {i + 1}: expected a JSON object with a 'text' field") from None
        return
    paragraph: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _unescape_wikitext(doc: str) -> str:
    for escaped, plain in _WIKITEXT_ESCAPES:
        doc = doc.replace(escaped, plain)
    return doc


SELF_CHUNK = 32  # texts sampled per seeded batch; the corpus grows by whole batches


def self_sampled_corpus(model: Model, n_texts: int, length: int, seed: int = 0, cache_root=None, progress: bool = True) -> Path:
    """At least ``n_texts`` texts of ``length`` tokens sampled from the model (top-k 40), cached as jsonl.

    Batch i of ``SELF_CHUNK`` texts is sampled with seed ``seed + i x SELF_CHUNK``, so a corpus only ever
    grows: a request for more texts appends batches, and a smaller request reads a prefix.
    """
    from tracekit.editing.context import STARTERS

    starter_tokens = max(len(model.tokenizer(s)["input_ids"]) for s in STARTERS)
    length = min(length, model.n_ctx - starter_tokens)  # starter + sample must fit the model's context
    folder = cache_dir(cache_root) / "corpus" / f"{slug(model.spec)}-{weight_fingerprint(model)}"
    path = folder / f"self-{length}tok-s{seed}.jsonl"
    if _whole_batches(path, repair=False) >= n_texts:
        return path
    with locked(path):  # a second process waits here, then finds the batches written
        have = _whole_batches(path, repair=True)
        if have >= n_texts:
            return path
        want = -(-n_texts // SELF_CHUNK) * SELF_CHUNK
        warnings.warn(f"sampling {want - have} texts of {length} tokens from the model itself for key statistics "
                      f"(cached at {path}); pass a corpus file for statistics of natural text", stacklevel=3)
        with _progress(progress) as bar:
            task = bar.add_task(f"sampling a corpus from {model.spec}", total=want, completed=have, rate="")
            for batch in range(have // SELF_CHUNK, want // SELF_CHUNK):
                starters = [STARTERS[(batch * SELF_CHUNK + i) % len(STARTERS)] for i in range(SELF_CHUNK)]
                texts = model.generate(starters, max_new_tokens=length, top_k=40, seed=seed + batch * SELF_CHUNK)
                with open(path, "a", encoding="utf-8") as out:  # whole lines only: a crash loses one batch
                    out.write("".join(json.dumps({"text": s + t}) + "\n" for s, t in zip(starters, texts)))
                bar.update(task, advance=SELF_CHUNK)
    return path


def _whole_batches(path: Path, repair: bool) -> int:
    """Texts in whole valid batches of a self-sampled corpus; with ``repair`` (only under the
    corpus lock: another process may be appending), the file is cut back to them (after a crash
    mid-write)."""
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines(keepends=True):
        try:
            json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            break
        if not line.endswith("\n"):
            break  # a line still being written
        lines.append(line.rstrip("\n"))
    keep = len(lines) - len(lines) % SELF_CHUNK
    if repair and keep != len(text.splitlines()):
        write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in lines[:keep]), encoding="utf-8"))
    return keep


def _samples(model: Model, path: Path, n_samples: int, sample_tokens: int) -> Iterator[list[int]]:
    """Token samples of exactly ``sample_tokens`` tokens from the documents, in order."""
    buffer: list[int] = []
    produced = 0
    wikitext = path.suffix == ".raw"
    for doc in _read_documents(path):
        if not doc.strip():
            continue
        if wikitext:
            doc = _unescape_wikitext(doc)
        buffer += model.tokenizer(doc)["input_ids"]
        while len(buffer) >= sample_tokens and produced < n_samples:
            yield buffer[:sample_tokens]
            buffer = buffer[sample_tokens:]
            produced += 1
        if produced >= n_samples:
            return


# ---- accumulation ------------------------------------------------------------------
def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


@torch.no_grad()
def accumulate(model: Model, layers: Sequence[int], batches: Iterator[torch.Tensor], total_tokens: int,
               dtype: torch.dtype, progress: bool = True) -> tuple[dict[int, torch.Tensor], int]:
    """Sum of k k^T per layer over the keys of every position of every batch [B, T].

    Each batch is one partial forward (``Model.forward``) up to the highest layer, whose edits at
    ``Site("mlp_in", l)`` fold the keys in and return them unchanged."""
    layers = sorted(set(layers))
    sums: dict[int, torch.Tensor] = {}

    def fold(layer):
        def edit(x):
            keys = x.reshape(-1, x.shape[-1]).to(dtype)
            sums[layer] = keys.T @ keys if layer not in sums else sums[layer].addmm_(keys.T, keys)
            return x
        return edit

    edits = {Site("mlp_in", layer): fold(layer) for layer in layers}
    seen = 0
    with _progress(progress) as bar:
        task = bar.add_task(f"key statistics, layer(s) {','.join(map(str, layers))}", total=total_tokens, rate="")
        for ids in batches:
            model.forward(ids, stop_layer=layers[-1] + 1, edits=edits)
            seen += ids.numel()
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, advance=ids.numel(), rate=f"{seen / elapsed:,.0f} tok/s")
    return sums, seen


# ---- cache and entry point ------------------------------------------------------------
def _expected(model: Model, layer: int, n_samples: int, sample_tokens: int, dtype: str, corpus_key: str) -> dict[str, str]:
    identity = cache_identity(model, layer)
    return {"format": FORMAT_VERSION, "spec": identity["spec"], "arch": identity["arch"],
            "fingerprint": identity["fingerprint"], "layer": str(layer), "n_samples": str(n_samples),
            "sample_tokens": str(sample_tokens), "dtype": dtype, "corpus": corpus_key}


def _mismatch(found: dict[str, str], expected: dict[str, str]) -> list[str]:
    return [f"{k}={found.get(k)!r} (expected {v!r})" for k, v in expected.items() if found.get(k) != v]


def matrix_sha256(matrix: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (any dtype)."""
    flat = matrix.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def key_dim(model: Model, layer: int) -> int:
    """d_mlp: the size of layer ``layer``'s MLP keys (the down-projection's input)."""
    return int(model.adapter.as_out_in(model.adapter.down_proj_weight(model.hf, layer)).shape[1])


def check_matrix(matrix: torch.Tensor, d_mlp: int | None, where: str) -> None:
    """A usable E[k k^T]: [d_mlp, d_mlp] and finite."""
    if d_mlp is not None and tuple(matrix.shape) != (d_mlp, d_mlp):
        raise TracekitError(f"{where} is a {tuple(matrix.shape)} matrix; this model's layer needs ({d_mlp}, {d_mlp})")
    if not bool(torch.isfinite(matrix).all()):
        raise TracekitError(f"{where} holds NaN or inf values")


def load_stats_file(path: Path, expected: dict[str, str] | None = None,
                    d_mlp: int | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a statistics file, checking its metadata against ``expected``, its checksum, shape and values."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            matrix = f.get_tensor("mom2")
    except Exception as err:  # a truncated or foreign file
        raise TracekitError(f"{path} is not a tracekit key-statistics file ({type(err).__name__}); delete it") from None
    if expected is not None:
        bad = _mismatch(metadata, expected)
        if bad:
            what = "another model" if any(b.startswith(("fingerprint", "arch", "spec")) for b in bad) else "other settings"
            raise TracekitError(f"key statistics {path} were computed for {what}: {'; '.join(bad[:3])}; "
                                "delete the file or compute new statistics (stats_file=None)")
    if metadata.get("sha256") != matrix_sha256(matrix):
        raise TracekitError(f"key statistics {path} do not match their checksum (the file was changed or "
                            "damaged); delete it")
    check_matrix(matrix, d_mlp, f"key statistics {path}")
    return matrix, metadata


def second_moments(model: Model, layers: Sequence[int], *, n_samples: int, sample_tokens: int = 128, dtype: str = "float32",
                   corpus: str | os.PathLike | None = None, corpus_seed: int = 0, batch_size: int = 16,
                   cache: bool = True, cache_root=None, stats_file: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[int, SecondMoment]:
    """C = E[k k^T] of MLP down-projection inputs at each of ``layers`` (cached; see module doc)."""
    check(dtype in _DTYPES, f"unknown statistics dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    check(n_samples >= 1 and sample_tokens >= 1, f"need n_samples >= 1 and sample_tokens >= 1, got {n_samples}, {sample_tokens}")
    layers = sorted({model.adapter.check_layer(model.hf, layer) for layer in layers})
    sample_tokens = min(sample_tokens, model.n_ctx)  # as ROME: samples are cut to the model's context
    source = resolve_corpus(corpus)
    if source is None:
        n_texts = -(-n_samples * 11 // 10)  # a text of sample_tokens tokens may re-tokenise a little shorter
        corpus_key = f"self-{weight_fingerprint(model)}-{sample_tokens}tok-s{corpus_seed}"
    else:
        corpus_key = source.key
    expected = {layer: _expected(model, layer, n_samples, sample_tokens, dtype, corpus_key) for layer in layers}
    if stats_file is not None:
        check(len(layers) == 1, "stats_file holds one layer's statistics; give one layer")
        path = Path(stats_file).expanduser()
        check(path.is_file(), f"stats file {path} does not exist")
        matrix, metadata = load_stats_file(path, expected[layers[0]], key_dim(model, layers[0]))
        return {layers[0]: SecondMoment(matrix, layers[0], metadata, path)}
    found: dict[int, SecondMoment] = {}
    paths = {layer: _cache_path(model, expected[layer], cache_root) for layer in layers}
    loaded = model_memo(model, _LOADED)  # a sweep reads each file (and checks its sha256) once
    for layer in layers:
        memo_key = _memo_key(paths[layer], expected[layer])
        if cache and memo_key is not None and memo_key in loaded:
            found[layer] = loaded[memo_key]
        elif cache and paths[layer].is_file():
            try:
                matrix, metadata = load_stats_file(paths[layer], expected[layer], key_dim(model, layer))
                found[layer] = loaded[memo_key] = SecondMoment(matrix, layer, metadata, paths[layer])
            except TracekitError as err:
                warnings.warn(f"recomputing stale key statistics: {err}", stacklevel=2)
    todo = [layer for layer in layers if layer not in found]
    if not todo:
        return found
    if source is None:
        path, description = self_sampled_corpus(model, n_texts, sample_tokens, corpus_seed, cache_root, progress), \
            f"text sampled from {model.spec} itself (seed {corpus_seed})"
    else:
        path, description = source.path, source.description
        if source.path == SHIPPED_TEXT:
            warnings.warn(f"no text corpus given or found ({', '.join(CORPUS_FILES[:6])}, wikitext/ ... in "
                          f"$TRACEKIT_DATA or ../shared/data): key statistics come from {SHIPPED_DESCRIPTION}; "
                          "pass a corpus file (or set TRACEKIT_DATA) for statistics of Wikipedia-like text",
                          stacklevel=2)
    samples = _samples(model, path, n_samples, sample_tokens)

    def batches():
        rows: list[list[int]] = []
        for sample in samples:
            rows.append(sample)
            if len(rows) == batch_size:
                yield torch.tensor(rows)
                rows = []
        if rows:
            yield torch.tensor(rows)

    sums, tokens = accumulate(model, todo, batches(), n_samples * sample_tokens, _DTYPES[dtype], progress)
    check(tokens > 0, f"the corpus {path} gave no samples of {sample_tokens} tokens")
    if tokens < n_samples * sample_tokens:
        warnings.warn(f"the corpus {path.name} gave {tokens // sample_tokens} samples of {sample_tokens} tokens, "
                      f"fewer than the {n_samples} asked; the statistics use those", stacklevel=2)
    for layer in todo:
        # kept in host memory, as statistics read from a file are: C is read once per layer, when its
        # factorisation is made (tracekit.editing.factors), and a sweep's layers would fill a GPU
        matrix = (sums.pop(layer) / tokens).contiguous().cpu()
        check_matrix(matrix, None, f"key statistics of {model.spec} at layer {layer} (the model gave NaN or inf keys)")
        metadata = {**expected[layer], "tokens": str(tokens), "source": description, "sha256": matrix_sha256(matrix)}
        if cache:
            from safetensors.torch import save_file

            write_atomic(paths[layer], lambda p, m=matrix, md=metadata: save_file({"mom2": m.cpu()}, str(p), metadata=md))
        found[layer] = SecondMoment(matrix, layer, metadata, paths[layer] if cache else None)
        memo_key = _memo_key(paths[layer], expected[layer]) if cache else None
        if memo_key is not None:
            loaded[memo_key] = found[layer]
    return found


def _memo_key(path: Path, expected: dict[str, str]) -> tuple | None:
    """What a loaded file is: its stat and a digest of its bytes (all of them up to 16 MiB, else 256
    strided 64 KiB blocks), so a file rewritten since it was read is read and checked again."""
    try:
        stat = path.stat()
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            if stat.st_size <= _WHOLE_FILE:
                digest.update(f.read())
            else:
                step = stat.st_size // _BLOCKS
                for i in range(_BLOCKS):
                    f.seek(i * step)
                    digest.update(f.read(_BLOCK))
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, digest.hexdigest(),
            tuple(sorted(expected.items())))


_WHOLE_FILE, _BLOCKS, _BLOCK = 16 << 20, 256, 64 << 10


def _cache_path(model: Model, expected: dict[str, str], cache_root) -> Path:
    corpus = hashlib.sha256(expected["corpus"].encode()).hexdigest()[:10]
    name = (f"layer{expected['layer']}-{expected['fingerprint']}-{corpus}-"
            f"{expected['n_samples']}x{expected['sample_tokens']}-{expected['dtype']}.safetensors")
    return cache_dir(cache_root) / "stats" / slug(model.spec) / name
