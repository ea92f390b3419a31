"""Data for language-model training and synthetic ablation tasks.

Contents, top to bottom:
- Byte tokenizer: ids 0..255 are bytes, then `BOS`, `EOS`, `PAD`; `encode`, `decode`.
- Corpora, split into train and validation by a stable hash of each document's key
  (`is_validation`): `load_stdlib_corpus` (the default: this interpreter's standard library,
  nothing to download), `load_python_corpus` (the standard library plus the installed
  packages' source, also offline and much larger), `load_text_files` (a local recursive glob),
  `load_hf_corpus` (optional Hugging Face `datasets`, imported only when called);
  `unigram_entropy_bits` as a baseline.
- Samplers, each drawing one global batch from a numpy Generator: `RandomWindows` (language
  modelling), `MQAR`, `MQARMixture` (MQAR rows of several settings, Zoology's training data)
  and `SelectiveCopy` (synthetic recall tasks for decay ablations).
- `BatchIterator`: infinite, deterministic, resumable, per-host sharded stream of batches.
- `EvalWindows`: finite, deterministic pass over validation tokens, last batch padded.
- `masked_accuracy`, and `make_datasets(config)`, the one factory the training loop calls.

Every batch is a dict of numpy arrays `{'inputs': int32 [B, T], 'targets': int32 [B, T],
'loss_mask': float32 [B, T]}`; `loss_mask` is 1 where the target counts, 0 elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import itertools
import math
import os
import pathlib
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

__all__ = [
    "BOS", "EOS", "PAD", "VOCAB_SIZE", "DEFAULT_PREFETCH", "Batch", "encode", "decode",
    "Corpus", "is_validation", "split_documents", "stdlib_files", "load_stdlib_corpus",
    "python_files", "load_python_corpus", "load_text_files", "load_hf_corpus",
    "unigram_entropy_bits",
    "Sampler", "RandomWindows", "MQAR", "MQARMixture", "SelectiveCopy",
    "BatchIterator", "EvalWindows", "masked_accuracy",
    "Datasets", "make_datasets", "load_corpus", "make_task",
]

BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259
TOKEN_DTYPE = np.uint16  # storage dtype of corpus token streams; batches are int32
DEFAULT_PREFETCH = 4     # batches drawn ahead on threads (`BatchIterator`, `make_datasets`)

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- tokenizer


def encode(text: str) -> np.ndarray:
    """Token ids of `text`: its UTF-8 bytes, int32 [num_bytes]. No BOS/EOS is added."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: Any) -> str:
    """Text of token ids (any integer array-like, flattened); drops BOS/EOS/PAD.

    Invalid UTF-8 (e.g. a character cut by sampling) decodes to U+FFFD.
    """
    ids = np.asarray(ids).reshape(-1)
    byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
    return byte_ids.tobytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Token streams of one text source, split by document.

    Attributes:
        train: uint16 [N_train]; each document as BOS, its bytes, EOS, concatenated.
        validation: uint16 [N_val]; same layout, documents disjoint from `train`.
    """

    train: np.ndarray
    validation: np.ndarray

    @property
    def num_documents(self) -> int:
        """Documents in both splits (their BOS tokens; one cut by `max_bytes` counts)."""
        return int(np.count_nonzero(self.train == BOS)
                   + np.count_nonzero(self.validation == BOS))


def is_validation(key: str, val_fraction: float) -> bool:
    """Whether the document named `key` is in validation: crc32(key) < val_fraction * 2**32.

    crc32 is fixed by zlib (unlike Python's salted `hash`), so a key lands in the same split on
    every machine and in every run.
    """
    return _key_hash(key) < val_fraction * 2**32


def _key_hash(key: str) -> int:
    """crc32 of the UTF-8 bytes of a document key, in [0, 2**32)."""
    return zlib.crc32(key.encode("utf-8"))


def split_documents(
    documents: Iterable[tuple[str, Callable[[], bytes]]],
    *,
    max_bytes: int | None = None,
    val_fraction: float = 0.03,
) -> Corpus:
    """Concatenates documents into train and validation streams, split by `is_validation`.

    Args:
        documents: `(key, read)` pairs in a fixed order; `read()` returns the document's bytes
            and is called only while the document's split has room left.
        max_bytes: cap on tokens (bytes plus BOS/EOS) over both splits, or None for everything;
            validation gets `val_fraction` of it. The document crossing a cap is cut there.
        val_fraction: share of documents (by key hash) and of `max_bytes` given to validation.

    Returns:
        The Corpus.

    Raises:
        ValueError: naming `val_fraction` or `max_bytes` when out of range, or when a split
            comes out empty.
    """
    budgets = _split_budgets(max_bytes, val_fraction)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    used = {"train": 0, "validation": 0}
    for key, read in documents:
        split = "validation" if is_validation(key, val_fraction) else "train"
        room = budgets[split] - used[split]
        if room > 0:
            tokens = _document_tokens(read())[:room]
            parts[split].append(tokens)
            used[split] += len(tokens)
        if all(used[s] >= budgets[s] for s in used):
            break
    for split, count in used.items():
        if count == 0:
            raise ValueError(
                f"the {split} split is empty (val_fraction={val_fraction}, "
                f"max_bytes={max_bytes}); use more documents, a larger max_bytes, or a "
                "val_fraction further from 0 and 1")
    return Corpus(train=np.concatenate(parts["train"]),
                  validation=np.concatenate(parts["validation"]))


def _split_budgets(max_bytes: int | None, val_fraction: float) -> dict[str, int]:
    """Token budget of each split; `sys.maxsize` stands for no cap."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if max_bytes is None:
        return {"train": sys.maxsize, "validation": sys.maxsize}
    _check_positive(max_bytes=max_bytes)
    validation = math.ceil(max_bytes * val_fraction)
    return {"train": max_bytes - validation, "validation": validation}


def _document_tokens(data: bytes) -> np.ndarray:
    """BOS, the bytes of `data`, EOS: uint16 [len(data) + 2]."""
    tokens = np.empty(len(data) + 2, dtype=TOKEN_DTYPE)
    tokens[0], tokens[-1] = BOS, EOS
    tokens[1:-1] = np.frombuffer(data, dtype=np.uint8)
    return tokens


# Directories never walked: installed packages (inside the stdlib), caches and tests, which are
# large and repetitive.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
     "_vendor"})


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """The stdlib root and its readable `.py` files as sorted relative POSIX paths.

    Skips installed packages, caches and test directories (`_SKIPPED_DIRS`).
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return root, _py_files(root)


def python_files() -> list[tuple[str, pathlib.Path]]:
    """Keys and paths of the 'python' corpus's documents, ordered by crc32 of the key.

    The standard library's files (`stdlib_files()`) are keyed 'stdlib/<relative path>', the
    installed packages' (sysconfig's purelib and platlib directories) 'site/<relative path>', so
    the same files get the same keys, order and split on every machine. Hash order rather than
    alphabetical order makes a `max_bytes` prefix a sample of every package.
    """
    stdlib_root, stdlib_paths = stdlib_files()
    keyed = [(f"stdlib/{p}", stdlib_root / p) for p in stdlib_paths]
    for root in _site_roots():
        keyed += [(f"site/{p}", root / p) for p in _py_files(root)]
    return sorted(keyed, key=lambda key_path: (_key_hash(key_path[0]), key_path[0]))


def _site_roots() -> list[pathlib.Path]:
    """sysconfig's purelib and platlib directories, resolved; once if they are the same."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(pathlib.Path(paths[k]).resolve() for k in ("purelib", "platlib")))


def _py_files(root: pathlib.Path) -> list[str]:
    """The readable `.py` files under `root` as sorted relative POSIX paths, not entering
    directories named in `_SKIPPED_DIRS`."""
    rel_paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        rel_dir = pathlib.Path(directory).relative_to(root)
        rel_paths += [(rel_dir / f).as_posix() for f in files
                      if f.endswith(".py") and os.access(os.path.join(directory, f), os.R_OK)]
    return sorted(rel_paths)


def load_stdlib_corpus(*, max_bytes: int | None = None, val_fraction: float = 0.03) -> Corpus:
    """The running interpreter's standard-library source (about 12 MB on CPython 3.11).

    Documents are the files of `stdlib_files()`, keyed by relative path, so the split is the same
    wherever the same Python version runs. See `split_documents` for the arguments.
    """
    root, rel_paths = stdlib_files()
    documents = ((p, (root / p).read_bytes) for p in rel_paths)
    return split_documents(documents, max_bytes=max_bytes, val_fraction=val_fraction)


def load_python_corpus(*, max_bytes: int | None = None, val_fraction: float = 0.03) -> Corpus:
    """The standard library's and every installed package's source: `python_files()`.

    Nothing to download, and much larger than the standard library alone (about 170 MB in this
    project's CPU environment with jax, flax and torch installed). Its stdlib documents carry
    the 'stdlib/' prefix, so their split differs from `load_stdlib_corpus`'s. See
    `split_documents` for the arguments.
    """
    documents = ((key, path.read_bytes) for key, path in python_files())
    return split_documents(documents, max_bytes=max_bytes, val_fraction=val_fraction)


_GLOB_MAGIC = re.compile(r"[*?[]")


def load_text_files(path: str, *, max_bytes: int | None = None,
                    val_fraction: float = 0.03) -> Corpus:
    """Local files matching the recursive glob `path`, e.g. 'docs/**/*.txt'.

    Documents are keyed by their path relative to the glob's fixed leading directories ('docs'
    above), so the split does not depend on where the tree lives. Files are read as raw bytes.
    See `split_documents` for the other arguments.

    Raises:
        ValueError: naming `path` if it matches no files.
    """
    pattern = os.path.expanduser(path)
    matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not matches:
        raise ValueError(f"path={path!r} matches no files")
    root = _glob_root(pattern)
    keyed = sorted((pathlib.Path(os.path.relpath(p, root)).as_posix(), p) for p in matches)
    documents = ((key, pathlib.Path(p).read_bytes) for key, p in keyed)
    return split_documents(documents, max_bytes=max_bytes, val_fraction=val_fraction)


def _glob_root(pattern: str) -> str:
    """The leading directories of `pattern` before its first wildcard component."""
    parts = pathlib.PurePath(pattern).parts[:-1]
    fixed = list(itertools.takewhile(lambda part: not _GLOB_MAGIC.search(part), parts))
    return os.path.join(*fixed) if fixed else "."


def load_hf_corpus(path: str, *, subset: str | None = None, split: str = "train",
                   text_field: str = "text", max_bytes: int | None = None,
                   val_fraction: float = 0.03) -> Corpus:
    """A Hugging Face dataset, streamed, one document per row (needs the `datasets` package).

    Rows of `split` are keyed by their index, so `max_bytes` stops the stream early. See
    `split_documents` for the other arguments.

    Args:
        path: dataset name on the Hub or a local path, as for `datasets.load_dataset`.
        subset: the dataset's configuration name, if it has several.
        split: which split to read; validation is carved out of it by key hash.
        text_field: the column holding the text.

    Raises:
        ImportError: if `datasets` is not installed.
        ValueError: naming `text_field` if rows lack that column.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "name='hf' needs the optional package `datasets`: pip install datasets") from e
    rows = datasets.load_dataset(path, subset, split=split, streaming=True)
    documents = ((str(i), _row_reader(row, text_field)) for i, row in enumerate(rows))
    return split_documents(documents, max_bytes=max_bytes, val_fraction=val_fraction)


def _row_reader(row: Mapping[str, Any], text_field: str) -> Callable[[], bytes]:
    """A `read()` for `split_documents` returning the UTF-8 bytes of `row[text_field]`."""

    def read() -> bytes:
        if text_field not in row:
            raise ValueError(f"text_field={text_field!r} is not a column; columns: {list(row)}")
        return row[text_field].encode("utf-8")

    return read


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Empirical unigram entropy of `tokens` (int array, any shape) in bits per token.

    For byte-level text this is bits/byte: what the best context-free byte model scores, the
    baseline a language model's bits/byte should beat.
    """
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise ValueError("tokens is empty")
    counts = np.bincount(tokens)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------- samplers


class Sampler(Protocol):
    """Draws one global batch: `sample(rng, batch_size) -> Batch` with [batch_size, T] arrays."""

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class RandomWindows:
    """Language-model windows of `seq_len + 1` tokens at uniform random offsets of `tokens`.

    Attributes:
        tokens: integer [N] token stream, N >= seq_len + 1.
        seq_len: T; inputs are window[:-1], targets window[1:], every target counts.
    """

    tokens: np.ndarray
    seq_len: int

    def __post_init__(self):
        _check_positive(seq_len=self.seq_len)
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(
                f"the corpus ({len(self.tokens)} tokens) is shorter than one window of "
                f"seq_len + 1 = {self.seq_len + 1}; lower seq_len or raise max_bytes")

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """A batch of `batch_size` windows; see the module docstring for the format."""
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=batch_size)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        return _batch(windows[:, :-1], windows[:, 1:], np.ones((batch_size, self.seq_len)))


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Zoology, Arora et al. 2023).

    A sequence of seq_len + 1 tokens opens with `num_kv_pairs` pairs `k v`; keys are distinct ids
    from [1, 1 + (vocab_size - 1) // 2), values distinct ids from the rest of [1, vocab_size). Then
    every key reappears once, in random order, at a random even offset after the opening,
    followed by its value; all other positions hold 0. Inputs are sequence[:-1], targets
    sequence[1:]; only the query-key positions, whose target is the bound value, count
    (`num_kv_pairs` per row). Queries are placed uniformly (Zoology biases them towards the end).
    """

    seq_len: int
    num_kv_pairs: int
    vocab_size: int

    def __post_init__(self):
        _check_positive(seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs,
                        vocab_size=self.vocab_size)
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(f"seq_len={self.seq_len} must be >= 4 * num_kv_pairs "
                             f"= {4 * self.num_kv_pairs}")
        if (self.vocab_size - 1) // 2 < self.num_kv_pairs:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 2 * num_kv_pairs + 1 "
                             f"= {2 * self.num_kv_pairs + 1}")

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """A batch of `batch_size` independent sequences; see the class docstring."""
        k = self.num_kv_pairs
        num_keys = (self.vocab_size - 1) // 2
        keys = 1 + _distinct(rng, batch_size, num_keys, k)  # [B, K]
        values = 1 + num_keys + _distinct(rng, batch_size, self.vocab_size - 1 - num_keys, k)
        order = _distinct(rng, batch_size, k, k)  # [B, K], which pair each query asks for
        num_slots = (self.seq_len + 1 - 2 * k) // 2
        query_pos = 2 * k + 2 * _distinct(rng, batch_size, num_slots, k)  # [B, K]
        rows = np.arange(batch_size)[:, None]
        seq = np.zeros((batch_size, self.seq_len + 1), np.int32)
        seq[:, 0:2 * k:2], seq[:, 1:2 * k:2] = keys, values
        seq[rows, query_pos] = np.take_along_axis(keys, order, axis=1)
        seq[rows, query_pos + 1] = np.take_along_axis(values, order, axis=1)
        mask = np.zeros((batch_size, self.seq_len), np.float32)
        mask[rows, query_pos] = 1
        return _batch(seq[:, :-1], seq[:, 1:], mask)


@dataclasses.dataclass(frozen=True)
class MQARMixture:
    """MQAR rows of several settings in every batch: Zoology's training data.

    Each row picks setting i with probability `weights[i] / sum(weights)`, is sampled by that
    setting's `MQAR`, and is right-padded to `seq_len` with token 0 (inputs and targets) and
    loss_mask 0, so every batch is [B, seq_len] however the rows were drawn. Zoology trains
    one model on ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64)) with weights (0.5,
    0.125, 0.125, 0.125, 0.125), then tests it at each setting on its own (`MQAR`).

    Attributes:
        seq_len: T, the padded row length: at least every setting's seq_len (normally the
            longest; more only costs compute).
        settings: (seq_len, num_kv_pairs) of each setting, each valid for `MQAR`.
        vocab_size: shared by all settings (see `MQAR`).
        weights: one positive weight per setting (normalised to sum to 1); None for equal
            weights. Lists (e.g. from a JSON config) are stored as tuples.
    """

    seq_len: int
    settings: tuple[tuple[int, int], ...]
    vocab_size: int
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        _check_positive(seq_len=self.seq_len)
        if not isinstance(self.settings, (tuple, list)) or not self.settings:
            raise ValueError("settings must be a non-empty sequence of (seq_len, "
                             f"num_kv_pairs) pairs, got {self.settings!r}")
        tasks = tuple(self._task(i, setting) for i, setting in enumerate(self.settings))
        object.__setattr__(self, "settings", tuple((t.seq_len, t.num_kv_pairs) for t in tasks))
        object.__setattr__(self, "weights", _mixture_weights(self.weights, len(tasks)))
        object.__setattr__(self, "_tasks", tasks)  # not a field: asdict and repr leave it out

    def _task(self, index: int, setting: Any) -> MQAR:
        """The MQAR of `settings[index]`; ValueError naming it if invalid or too long."""
        if not isinstance(setting, (tuple, list)) or len(setting) != 2:
            raise ValueError(f"settings[{index}]={setting!r} must be a (seq_len, "
                             "num_kv_pairs) pair")
        try:
            task = MQAR(seq_len=setting[0], num_kv_pairs=setting[1],
                        vocab_size=self.vocab_size)
        except ValueError as e:
            raise ValueError(f"settings[{index}]={tuple(setting)}: {e}") from e
        if task.seq_len > self.seq_len:
            raise ValueError(f"settings[{index}]={tuple(setting)} is longer than "
                             f"seq_len={self.seq_len}, the padded row length")
        return task

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """A batch of `batch_size` rows, each from one setting; see the class docstring."""
        weights = np.asarray(self.weights)
        choice = rng.choice(len(weights), size=batch_size, p=weights / weights.sum())
        zeros = np.zeros((batch_size, self.seq_len))
        batch = _batch(zeros, zeros, zeros)
        for i, task in enumerate(self._tasks):
            rows = np.flatnonzero(choice == i)
            if rows.size:
                for key, value in task.sample(rng, rows.size).items():
                    batch[key][rows, :task.seq_len] = value
        return batch


def _mixture_weights(weights: Any, count: int) -> tuple[float, ...]:
    """`weights` as a tuple of `count` positive floats (all 1.0 if None); else ValueError."""
    if weights is None:
        return (1.0,) * count
    if not isinstance(weights, (tuple, list)) or len(weights) != count:
        raise ValueError(f"weights={weights!r} must have one entry per setting ({count})")
    for i, w in enumerate(weights):
        if (not isinstance(w, (int, float, np.integer, np.floating)) or isinstance(w, bool)
                or not 0 < w < math.inf):
            raise ValueError(f"weights[{i}]={w!r} must be a positive number")
    return tuple(float(w) for w in weights)


SELECTIVE_COPY_BLANK = 0
SELECTIVE_COPY_SEPARATOR = 1


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
    """Selective copying (Gu & Dao 2023, Mamba): recall data tokens scattered among blanks.

    Inputs: `seq_len - num_tokens` positions of blanks (0) holding `num_tokens` data tokens from
    [2, vocab_size) at random positions, then `num_tokens` separators (1). Targets: at the
    separator positions, the data tokens in order (loss_mask 1); elsewhere blank (loss_mask 0).
    Targets are not inputs shifted: the answers are never fed back as inputs.
    """

    seq_len: int
    num_tokens: int
    vocab_size: int

    def __post_init__(self):
        _check_positive(seq_len=self.seq_len, num_tokens=self.num_tokens,
                        vocab_size=self.vocab_size)
        if self.seq_len < 2 * self.num_tokens:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 * num_tokens "
                             f"= {2 * self.num_tokens}")
        if self.vocab_size < 3:
            raise ValueError(
                f"vocab_size={self.vocab_size} must be >= 3 (blank, separator, data)")

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """A batch of `batch_size` independent sequences; see the class docstring."""
        region = self.seq_len - self.num_tokens
        data = rng.integers(2, self.vocab_size, size=(batch_size, self.num_tokens))
        positions = np.sort(_distinct(rng, batch_size, region, self.num_tokens), axis=1)
        shape = (batch_size, self.seq_len)
        inputs = np.full(shape, SELECTIVE_COPY_BLANK, np.int32)
        inputs[np.arange(batch_size)[:, None], positions] = data
        inputs[:, region:] = SELECTIVE_COPY_SEPARATOR
        targets = np.full(shape, SELECTIVE_COPY_BLANK, np.int32)
        targets[:, region:] = data
        mask = np.zeros(shape, np.float32)
        mask[:, region:] = 1
        return _batch(inputs, targets, mask)


def _distinct(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
    """Per row, k distinct ints from [0, n) in uniformly random order: int64 [rows, k].

    The positions of each row's k smallest of n uniform draws, by increasing draw: the first k
    of a full argsort, found with a partition and a sort of k: at the gpu-scale MQAR sizes
    (n = 4,096, rows = 128) a batch took 9.5 ms instead of 20 ms on a 2-core CPU, likely
    as long as the GPU's whole training step on that small model (an estimate, not measured).
    """
    draws = rng.random((rows, n))
    if k == n:
        return np.argsort(draws, axis=1)
    smallest = np.argpartition(draws, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(draws, smallest, axis=1), axis=1)
    return np.take_along_axis(smallest, order, axis=1)


def _batch(inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> Batch:
    """The batch dict, with the dtypes every batch has."""
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "loss_mask": loss_mask.astype(np.float32)}


# ----------------------------------------------------------------------------- iteration


class BatchIterator:
    """Infinite stream of this host's rows of deterministic global batches.

    Global batch number `step` is `sampler.sample(default_rng((seed, stream, step)),
    batch_size)`, so it depends on nothing else: resuming is exact and O(1), and `get_state()`
    is just `{'seed': int, 'step': int}` (JSON-able). Every process draws the same global batch
    and keeps rows [process_index * b, (process_index + 1) * b), b = batch_size // process_count,
    so the hosts' rows are disjoint and concatenate, in process order, to the global batch.
    `stream` separates independent streams of one seed (0 for training, 1 for evaluation).

    `prefetch` > 0 draws the next `prefetch` batches on as many threads while the caller uses
    the current one (numpy releases the GIL in the heavy parts): the gpu-scale MQAR mixture's
    batches of 128 took 17.4 ms one after another and 11.1 ms each on 2 threads of a 2-core
    CPU, while the GPU's step on that small model is shorter. The batches are the same.
    """

    def __init__(self, sampler: Sampler, *, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, stream: int = 0,
                 prefetch: int = 0):
        _check_non_negative(seed=seed, stream=stream, prefetch=prefetch)
        self.sampler = sampler
        self.batch_size = batch_size
        self._rows = _host_rows(batch_size, process_index, process_count)
        self._stream = stream
        self._seed = seed
        self._step = 0
        self._prefetch = prefetch
        self._pool = (concurrent.futures.ThreadPoolExecutor(prefetch, "batches")
                      if prefetch else None)
        self._ahead: dict[int, concurrent.futures.Future] = {}   # step -> its batch, drawing

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        step = self._step
        if self._pool is None:
            batch = self.batch_at(step)
        else:
            for ahead in range(step, step + self._prefetch + 1):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._pool.submit(self.batch_at, ahead)
            batch = self._ahead.pop(step).result()
        self._step += 1
        return batch

    def batch_at(self, step: int) -> Batch:
        """This host's rows of global batch `step`: arrays [batch_size // process_count, T]."""
        rng = np.random.default_rng((self._seed, self._stream, step))
        batch = self.sampler.sample(rng, self.batch_size)
        return {key: value[self._rows] for key, value in batch.items()}

    def get_state(self) -> dict[str, int]:
        """JSON-able state: the seed and the number of batches taken so far."""
        return {"seed": self._seed, "step": self._step}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Resumes from `get_state()`'s result; the next batch is global batch `state['step']`."""
        _check_non_negative(seed=state["seed"], step=state["step"])
        self._seed, self._step = int(state["seed"]), int(state["step"])
        for future in self._ahead.values():      # drawn for the old position or seed
            future.cancel()
        self._ahead.clear()


class EvalWindows:
    """Finite, deterministic pass over `tokens` in non-overlapping windows, for evaluation.

    Window i has inputs tokens[i*T : (i+1)*T] and targets tokens[i*T+1 : (i+1)*T+1], so each
    token after the first is a target exactly once. Windows form global batches of
    `batch_size`; the tail of the last window and the rows past the last window are PAD with
    loss_mask 0. Each process gets its rows of every global batch (as in `BatchIterator`), and
    every process gets the same number of batches, `len(self)`, at most `max_batches` if that is
    not None. Iterating again starts again from the beginning. `tokens` is integer [N], N >= 2.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 max_batches: int | None = None, process_index: int = 0,
                 process_count: int = 1):
        _check_positive(seq_len=seq_len)
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
        if len(tokens) < 2:
            raise ValueError(f"validation has {len(tokens)} tokens, needs >= 2; "
                             "raise max_bytes or val_fraction")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self._rows = _host_rows(batch_size, process_index, process_count)
        num_windows = math.ceil((len(tokens) - 1) / seq_len)
        self._num_batches = math.ceil(num_windows / batch_size)
        if max_batches is not None:
            self._num_batches = min(self._num_batches, max_batches)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        return (self._batch(i) for i in range(len(self)))

    def _batch(self, index: int) -> Batch:
        """This host's rows of global batch `index`: arrays [batch_size // process_count, T]."""
        windows = index * self.batch_size + np.arange(self.batch_size)[self._rows]
        positions = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [b, T + 1]
        valid = positions < len(self.tokens)
        clipped = np.minimum(positions, len(self.tokens) - 1)
        padded = np.where(valid, self.tokens[clipped].astype(np.int32), PAD)
        return _batch(padded[:, :-1], padded[:, 1:], valid[:, 1:])


def _host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that belong to `process_index`."""
    _check_positive(batch_size=batch_size, process_count=process_count)
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def masked_accuracy(logits_or_predictions: Any, targets: Any, loss_mask: Any) -> Any:
    """Share of counted positions predicted correctly (numpy or jax arrays; jittable).

    Args:
        logits_or_predictions: float [B, T, V] logits (argmax is taken) or int [B, T]
            predictions.
        targets: int [B, T].
        loss_mask: float [B, T], 1 where a position counts (e.g. MQAR query positions).

    Returns:
        float32 scalar of the inputs' array kind; 0 when nothing counts.
    """
    predictions = logits_or_predictions
    if predictions.ndim == targets.ndim + 1:
        predictions = predictions.argmax(-1)
    correct = (predictions == targets) * loss_mask
    return correct.sum() / loss_mask.sum().clip(min=1e-12)


# ----------------------------------------------------------------------------- factory


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What the training loop needs from the data.

    Attributes:
        train: infinite, resumable iterator of this host's training batches.
        make_eval: returns a fresh, finite iterator of this host's evaluation batches (the same
            batches on every call).
        vocab_size: vocabulary size a model needs for this data.
        metadata: JSON-able facts: `name`, and for text `documents`, `train_tokens`,
            `validation_tokens`, `unigram_entropy_bits` (of the validation tokens, the
            baseline for eval bits/byte); for tasks their fields.
    """

    train: BatchIterator
    make_eval: Callable[[], Iterator[Batch]]
    vocab_size: int
    metadata: dict[str, Any]


TEXT_SOURCES = ("stdlib", "python", "files", "hf")
TASKS = ("mqar", "mqar_mixture", "selective_copy")


def make_datasets(config: Any, *, process_index: int = 0, process_count: int = 1) -> Datasets:
    """Builds training and evaluation data from a config (dict, ConfigDict or attribute object).

    Config fields (missing ones take the default; `seq_len` and `batch_size` are required):
        name: 'stdlib' (default, `load_stdlib_corpus`), 'python' (`load_python_corpus`),
            'files', 'hf', 'mqar', 'mqar_mixture' or 'selective_copy'.
        seq_len: T, tokens per row (for 'mqar_mixture' the padded length).
        batch_size: global batch size B, divisible by `process_count`.
        seed: 0; seeds the training stream (and the synthetic evaluation stream).
        eval_batches: cap on evaluation batches; default None (text: the whole validation
            split) or 8 (tasks).
        prefetch: DEFAULT_PREFETCH; training batches drawn ahead on that many threads
            (`BatchIterator`); 0 draws each when it is asked for. Changes no batch.
        Text sources:
            max_bytes: None; cap on tokens loaded over both splits (e.g. 4_000_000 on CPU).
            val_fraction: 0.03; share of documents (by stable hash of their key) for validation.
            path: 'files': recursive glob such as 'docs/**/*.txt'; 'hf': dataset name or path.
            hf_subset: None, hf_split: 'train', text_field: 'text' ('hf' only).
        'mqar': num_kv_pairs: 8, vocab_size: 8192 (see `MQAR`).
        'mqar_mixture': settings (required): ((seq_len, num_kv_pairs), ...); weights: None
            (equal), else one per setting; vocab_size: 8192 (see `MQARMixture`).
        'selective_copy': num_tokens: 16, vocab_size: 16 (see `SelectiveCopy`).

    Args:
        config: the data config.
        process_index: this host's index (`jax.process_index()`).
        process_count: number of hosts (`jax.process_count()`).

    Returns:
        Datasets: this host's training iterator, evaluation factory, vocab size and metadata.

    Raises:
        ValueError: naming the field, for an unknown `name` or an invalid value.
    """
    name = _field(config, "name", "stdlib")
    hosts = {"process_index": process_index, "process_count": process_count}
    if name in TEXT_SOURCES:
        return _text_datasets(config, load_corpus(config), **hosts)
    if name in TASKS:
        return _task_datasets(config, make_task(config), **hosts)
    raise ValueError(f"name={name!r} is not one of {TEXT_SOURCES + TASKS}")


def load_corpus(config: Any) -> Corpus:
    """The Corpus named by a text-source config; fields as in `make_datasets`."""
    name = _field(config, "name", "stdlib")
    common = {"max_bytes": _field(config, "max_bytes", None),
              "val_fraction": _field(config, "val_fraction", 0.03)}
    if name == "stdlib":
        return load_stdlib_corpus(**common)
    if name == "python":
        return load_python_corpus(**common)
    if name == "files":
        return load_text_files(_required(config, "path"), **common)
    if name == "hf":
        return load_hf_corpus(_required(config, "path"),
                              subset=_field(config, "hf_subset", None),
                              split=_field(config, "hf_split", "train"),
                              text_field=_field(config, "text_field", "text"), **common)
    raise ValueError(f"name={name!r} is not one of {TEXT_SOURCES}")


def make_task(config: Any) -> MQAR | MQARMixture | SelectiveCopy:
    """The synthetic task named by a task config; fields as in `make_datasets`."""
    name = _field(config, "name", None)
    seq_len = _required(config, "seq_len")
    if name == "mqar":
        return MQAR(seq_len=seq_len, num_kv_pairs=_field(config, "num_kv_pairs", 8),
                    vocab_size=_field(config, "vocab_size", 8192))
    if name == "mqar_mixture":
        return MQARMixture(seq_len=seq_len, settings=_required(config, "settings"),
                           weights=_field(config, "weights", None),
                           vocab_size=_field(config, "vocab_size", 8192))
    if name == "selective_copy":
        return SelectiveCopy(seq_len=seq_len, num_tokens=_field(config, "num_tokens", 16),
                             vocab_size=_field(config, "vocab_size", 16))
    raise ValueError(f"name={name!r} is not one of {TASKS}")


def _text_datasets(config: Any, corpus: Corpus, *, process_index: int,
                   process_count: int) -> Datasets:
    """Random training windows of `corpus.train`, a full pass over `corpus.validation`."""
    seq_len, batch_size = _required(config, "seq_len"), _required(config, "batch_size")
    batching = {"batch_size": batch_size, "process_index": process_index,
                "process_count": process_count}
    train = BatchIterator(RandomWindows(corpus.train, seq_len), seed=_field(config, "seed", 0),
                          prefetch=_field(config, "prefetch", DEFAULT_PREFETCH), **batching)
    evaluation = EvalWindows(corpus.validation, seq_len=seq_len,
                             max_batches=_field(config, "eval_batches", None), **batching)
    metadata = {"name": _field(config, "name", "stdlib"),
                "documents": corpus.num_documents,
                "train_tokens": len(corpus.train),
                "validation_tokens": len(corpus.validation),
                "unigram_entropy_bits": unigram_entropy_bits(corpus.validation)}
    return Datasets(train=train, make_eval=evaluation.__iter__, vocab_size=VOCAB_SIZE,
                    metadata=metadata)


def _task_datasets(config: Any, task: MQAR | MQARMixture | SelectiveCopy, *, process_index: int,
                   process_count: int) -> Datasets:
    """Training stream 0 and a fixed evaluation set from stream 1 of the task's batches."""
    batching = {"batch_size": _required(config, "batch_size"),
                "seed": _field(config, "seed", 0),
                "process_index": process_index, "process_count": process_count}
    eval_batches = _field(config, "eval_batches", 8)
    _check_positive(eval_batches=eval_batches)
    train = BatchIterator(task, stream=0,
                          prefetch=_field(config, "prefetch", DEFAULT_PREFETCH), **batching)

    def make_eval() -> Iterator[Batch]:   # drawn on demand: a few batches, none wasted
        return itertools.islice(BatchIterator(task, stream=1, **batching), eval_batches)

    metadata = {"name": _field(config, "name", None), **dataclasses.asdict(task)}
    return Datasets(train=train, make_eval=make_eval, vocab_size=task.vocab_size,
                    metadata=metadata)


# ----------------------------------------------------------------------------- checks


def _field(config: Any, key: str, default: Any) -> Any:
    """`config[key]` for mappings, `config.key` otherwise (ConfigDict, dataclass), or default."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _required(config: Any, key: str) -> Any:
    """`_field` without a default: a missing or None field is a ValueError naming it."""
    value = _field(config, key, None)
    if value is None:
        raise ValueError(f"the data config needs the field {key}")
    return value


def _check_positive(**fields: Any) -> None:
    """ValueError naming the first field that is not a positive integer."""
    for name, value in fields.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative(**fields: Any) -> None:
    """ValueError naming the first field that is not a non-negative integer."""
    for name, value in fields.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
