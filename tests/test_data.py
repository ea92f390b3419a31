"""Tokenizer, corpora and split, deterministic batching, synthetic tasks, and the factory.

Corpora are kept small (`max_bytes`) so the whole file runs in a few seconds on CPU.
"""

import json
import sys
import types
import zlib

import numpy as np
import pytest

from retnet_jax import data

SMALL = 300_000  # max_bytes for stdlib tests


@pytest.fixture(scope="module")
def stdlib_corpus():
    return data.load_stdlib_corpus(max_bytes=SMALL)


def write_tree(root, num_files=60):
    """Files root/sub{i % 3}/doc{i}.txt with distinct contents; returns {key: text}."""
    docs = {}
    for i in range(num_files):
        key = f"sub{i % 3}/doc{i}.txt"
        docs[key] = f"document {i}: " + "é" * (i % 5) + "x" * i
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(docs[key], encoding="utf-8")
    return docs


def documents_of(tokens):
    """Texts of the BOS ... EOS documents in a token stream."""
    text_ids = np.asarray(tokens, np.int64)
    ends = np.flatnonzero(text_ids == data.EOS)
    starts = np.flatnonzero(text_ids == data.BOS)
    return [data.decode(text_ids[s + 1:e]) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld", "日本語 🙂 ∑x²", "a\x00b\n"])
def test_encode_decode_round_trip(text):
    ids = data.encode(text)
    assert ids.dtype == np.int32
    assert len(ids) == len(text.encode("utf-8"))
    assert ((ids >= 0) & (ids < 256)).all()
    assert data.decode(ids) == text


def test_decode_drops_specials_and_replaces_invalid_utf8():
    ids = np.concatenate([[data.BOS], data.encode("ab"), [data.EOS, data.PAD]])
    assert data.decode(ids) == "ab"
    assert data.decode(data.encode("é")[:1]) == "\ufffd"
    assert data.VOCAB_SIZE == data.PAD + 1 == 259


# ----------------------------------------------------------------------------- corpora


def test_stdlib_split_is_deterministic_and_by_file():
    _, paths = data.stdlib_files()
    assert paths == sorted(paths) and len(paths) > 100
    assert not any("site-packages" in p or "/test/" in f"/{p}" for p in paths)
    in_val = [data.is_validation(p, 0.03) for p in paths]
    assert 0.01 < np.mean(in_val) < 0.06
    assert in_val == [data.is_validation(p, 0.03) for p in paths]
    a = data.load_stdlib_corpus(max_bytes=100_000)
    b = data.load_stdlib_corpus(max_bytes=100_000)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.validation, b.validation)
    assert len(a.train) + len(a.validation) == 100_000
    assert a.train.dtype == np.uint16 and a.train[0] == data.BOS


@pytest.fixture(scope="module")
def python_files():
    return data.python_files()


def test_python_files_are_stdlib_and_site_keyed_and_in_hash_order(python_files):
    keys = [key for key, _ in python_files]
    assert len(set(keys)) == len(keys)  # purelib and platlib are one directory in a venv
    _, stdlib_paths = data.stdlib_files()
    assert {k for k in keys if k.startswith("stdlib/")} == {f"stdlib/{p}" for p in stdlib_paths}
    site = [k for k in keys if k.startswith("site/")]
    assert len(site) + len(stdlib_paths) == len(keys) and len(site) > len(stdlib_paths)
    assert not any(part in {"__pycache__", "test", "tests"}
                   for k in site for part in k.split("/")[1:-1])
    assert all(path.is_file() and path.suffix == ".py" for _, path in python_files)
    hashes = [zlib.crc32(k.encode()) for k in keys]
    assert hashes == sorted(hashes) and keys != sorted(keys)
    # A small max_bytes takes files from both sources and from many packages.
    first = keys[:40]
    assert any(k.startswith("stdlib/") for k in first)
    assert len({k.split("/")[1] for k in first if k.startswith("site/")}) > 5


def test_python_corpus_is_larger_than_stdlib(python_files):
    root, stdlib_paths = data.stdlib_files()
    stdlib_bytes = sum((root / p).stat().st_size for p in stdlib_paths)
    python_bytes = sum(path.stat().st_size for _, path in python_files)
    assert python_bytes > 2 * stdlib_bytes


def test_python_corpus_is_capped_deterministic_and_follows_the_listing(python_files):
    a = data.load_python_corpus(max_bytes=SMALL)
    b = data.load_python_corpus(max_bytes=SMALL)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.validation, b.validation)
    assert (len(a.train), len(a.validation)) == (SMALL - 9000, 9000)
    for split, tokens in (("train", a.train), ("validation", a.validation)):
        path = next(p for k, p in python_files
                    if data.is_validation(k, 0.03) == (split == "validation"))
        first = np.frombuffer(path.read_bytes()[:len(tokens) - 1], np.uint8)
        np.testing.assert_array_equal(tokens[1:1 + len(first)], first, err_msg=split)


def test_file_split_is_disjoint_complete_and_location_independent(tmp_path):
    docs = write_tree(tmp_path / "here" / "corpus")
    write_tree(tmp_path / "elsewhere")
    corpus = data.load_text_files(str(tmp_path / "here" / "corpus" / "**" / "*.txt"),
                                  val_fraction=0.3)
    train, val = documents_of(corpus.train), documents_of(corpus.validation)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(docs.values())
    assert sorted(val) == sorted(t for k, t in docs.items() if data.is_validation(k, 0.3))
    moved = data.load_text_files(str(tmp_path / "elsewhere" / "**" / "*.txt"), val_fraction=0.3)
    np.testing.assert_array_equal(moved.validation, corpus.validation)


def test_max_bytes_caps_both_splits(tmp_path):
    write_tree(tmp_path)
    corpus = data.load_text_files(str(tmp_path / "**/*.txt"), max_bytes=1000, val_fraction=0.2)
    assert (len(corpus.train), len(corpus.validation)) == (800, 200)
    assert corpus.num_documents == len(documents_of(corpus.train)) + len(
        documents_of(corpus.validation)) + 2  # the document crossing each cap is cut there
    assert data.load_text_files(str(tmp_path / "**/*.txt")).num_documents == 60


def test_files_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="path="):
        data.load_text_files(str(tmp_path / "nothing" / "**" / "*.txt"))
    write_tree(tmp_path, num_files=2)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_text_files(str(tmp_path / "**/*.txt"), val_fraction=1e-9)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_text_files(str(tmp_path / "**/*.txt"), val_fraction=0.0)
    with pytest.raises(ValueError, match="max_bytes"):
        data.load_text_files(str(tmp_path / "**/*.txt"), max_bytes=0)


def test_hf_source_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_hf_corpus("some/dataset")
    rows = [{"text": f"row {i} " * 3} for i in range(200)]
    fake = types.SimpleNamespace(load_dataset=lambda path, subset, split, streaming: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = data.make_datasets({"name": "hf", "path": "some/dataset", "seq_len": 8,
                              "batch_size": 2, "val_fraction": 0.1})
    assert out.metadata["train_tokens"] + out.metadata["validation_tokens"] == sum(
        len(r["text"]) + 2 for r in rows)
    with pytest.raises(ValueError, match="text_field"):
        data.load_hf_corpus("some/dataset", text_field="content")


def test_unigram_entropy(stdlib_corpus):
    assert 4 < data.unigram_entropy_bits(stdlib_corpus.train) < 6
    assert data.unigram_entropy_bits(np.arange(256)) == pytest.approx(8)
    assert data.unigram_entropy_bits(np.zeros(10, np.int32)) == 0


# ----------------------------------------------------------------------------- batching


def lm_iterator(tokens, **kwargs):
    kwargs = {"batch_size": 8, "seed": 3, **kwargs}
    return data.BatchIterator(data.RandomWindows(tokens, 16), **kwargs)


def test_lm_batches_are_shifted_windows():
    tokens = np.arange(5000, dtype=np.uint16)  # every window is a run of consecutive ids
    batch = next(lm_iterator(tokens))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 16), np.int32), "targets": ((8, 16), np.int32),
        "loss_mask": ((8, 16), np.float32)}
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    np.testing.assert_array_equal(np.diff(batch["inputs"], axis=1), 1)
    assert batch["loss_mask"].all()


def test_lm_batches_from_corpus(stdlib_corpus):
    batch = next(lm_iterator(stdlib_corpus.train))
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < data.VOCAB_SIZE


@pytest.mark.parametrize("make", [
    lambda: lm_iterator(np.arange(5000, dtype=np.uint16)),
    lambda: data.BatchIterator(data.MQAR(64, 4, 32), batch_size=4, seed=1),
    lambda: data.BatchIterator(data.MQAR(64, 4, 32), batch_size=4, seed=1, prefetch=3),
])
def test_resume_is_exact(make):
    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(7)]
    first = make()
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state == {"seed": first.get_state()["seed"], "step": 4}
    resumed = make()
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_prefetching_draws_the_same_batches():
    """Batches drawn ahead on threads are the ones drawn on demand, also after set_state moves
    the stream (back, or to another seed) with batches of the old position in flight."""
    mixture = data.MQARMixture(64, ((16, 2), (64, 8)), vocab_size=64, weights=(3, 1))
    plain = data.BatchIterator(mixture, batch_size=8, seed=2)
    ahead = data.BatchIterator(mixture, batch_size=8, seed=2, prefetch=3)
    def same(a, b):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for _ in range(6):
        same(next(ahead), next(plain))
    for state in ({"seed": 2, "step": 1}, {"seed": 7, "step": 4}):
        ahead.set_state(state)
        for step in range(state["step"], state["step"] + 4):
            same(next(ahead), data.BatchIterator(mixture, batch_size=8,
                                                 seed=state["seed"]).batch_at(step))
    with pytest.raises(ValueError, match="prefetch must be a non-negative integer"):
        data.BatchIterator(mixture, batch_size=8, prefetch=-1)


def test_different_seeds_and_steps_differ():
    tokens = np.arange(5000, dtype=np.uint16)
    a, b = lm_iterator(tokens, seed=0), lm_iterator(tokens, seed=1)
    first = next(a)
    assert not np.array_equal(first["inputs"], next(b)["inputs"])
    assert not np.array_equal(first["inputs"], next(a)["inputs"])


@pytest.mark.parametrize("sampler", [data.RandomWindows(np.arange(5000, dtype=np.uint16), 16),
                                     data.SelectiveCopy(32, 4, 10)])
def test_hosts_get_disjoint_rows_of_the_global_batch(sampler):
    whole = data.BatchIterator(sampler, batch_size=8, seed=5).batch_at(2)
    hosts = [data.BatchIterator(sampler, batch_size=8, seed=5, process_index=i,
                                process_count=4).batch_at(2) for i in range(4)]
    for key in whole:
        assert all(h[key].shape[0] == 2 for h in hosts)
        np.testing.assert_array_equal(np.concatenate([h[key] for h in hosts]), whole[key])


def test_eval_windows_count_every_target_once():
    tokens = np.arange(1, 102, dtype=np.uint16)  # 101 tokens: 100 targets, 7 windows of 16
    evaluation = data.EvalWindows(tokens, seq_len=16, batch_size=4)
    batches = list(evaluation)
    assert len(evaluation) == len(batches) == 2
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    mask = np.concatenate([b["loss_mask"] for b in batches]).astype(bool)
    np.testing.assert_array_equal(targets[mask], tokens[1:])
    np.testing.assert_array_equal(inputs[mask], tokens[:-1])
    assert (targets[~mask] == data.PAD).all() and mask.sum() == 100
    assert [len(b["inputs"]) for b in evaluation] == [4, 4]  # iterable again, same result


def test_eval_windows_cap_and_hosts():
    tokens = np.arange(1, 1002, dtype=np.uint16)
    assert len(data.EvalWindows(tokens, seq_len=10, batch_size=4, max_batches=3)) == 3
    whole = list(data.EvalWindows(tokens, seq_len=10, batch_size=4))
    hosts = [list(data.EvalWindows(tokens, seq_len=10, batch_size=4, process_index=i,
                                   process_count=2)) for i in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole) == 25
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([h[step][key] for h in hosts]), batch[key])


def test_batching_errors_name_the_field():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="seq_len"):
        data.RandomWindows(tokens, 0)
    with pytest.raises(ValueError, match="seq_len"):
        data.RandomWindows(tokens, 100)  # needs 101 tokens
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        lm_iterator(tokens, batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        lm_iterator(tokens, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        lm_iterator(tokens, batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        lm_iterator(tokens, seed=-1)
    with pytest.raises(ValueError, match="max_batches"):
        data.EvalWindows(tokens, seq_len=8, batch_size=2, max_batches=0)
    with pytest.raises(ValueError, match="validation"):
        data.EvalWindows(tokens[:1], seq_len=8, batch_size=2)


# ----------------------------------------------------------------------------- tasks


def assert_mqar_row(inputs, targets, mask, *, seq_len, num_kv_pairs, vocab_size):
    """One row (arrays [seq_len]) of `MQAR(seq_len, num_kv_pairs, vocab_size)`."""
    k, num_keys = num_kv_pairs, (vocab_size - 1) // 2
    assert mask.sum() == k
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    keys, values = inputs[0:2 * k:2], inputs[1:2 * k:2]
    assert len(set(keys)) == k and len(set(values)) == k
    assert keys.min() >= 1 and keys.max() < 1 + num_keys <= values.min()
    assert values.max() < vocab_size
    bound = dict(zip(keys, values))
    queries = np.flatnonzero(mask)
    assert (queries >= 2 * k).all()
    assert sorted(inputs[queries]) == sorted(keys)  # each key queried once
    assert [bound[key] for key in inputs[queries]] == list(targets[queries])
    rest = np.setdiff1d(np.arange(2 * k, seq_len), np.concatenate([queries, queries + 1]))
    assert (inputs[rest] == 0).all()


def test_mqar_targets_are_the_bound_values():
    task = data.MQAR(seq_len=64, num_kv_pairs=8, vocab_size=40)
    batch = task.sample(np.random.default_rng(0), 16)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    assert inputs.shape == targets.shape == mask.shape == (16, 64)
    for row in range(16):
        assert_mqar_row(inputs[row], targets[row], mask[row], seq_len=64, num_kv_pairs=8,
                        vocab_size=40)


@pytest.mark.parametrize("rows,n,k", [(128, 4096, 16), (64, 448, 128), (9, 7, 7), (5, 3, 1)])
def test_distinct_draws_are_the_first_k_of_a_full_argsort(rows, n, k):
    # The same draws and the same result as argsort(draws)[:, :k], so every task batch (and
    # every committed MQAR result) is unchanged by the faster partition.
    expected = np.argsort(np.random.default_rng(3).random((rows, n)), axis=1)[:, :k]
    np.testing.assert_array_equal(data._distinct(np.random.default_rng(3), rows, n, k),
                                  expected)


def test_mqar_fills_the_sequence_at_the_tightest_length():
    batch = data.MQAR(seq_len=16, num_kv_pairs=4, vocab_size=9).sample(
        np.random.default_rng(1), 32)
    assert (batch["loss_mask"].sum(axis=1) == 4).all()


def test_mqar_mixture_rows_are_padded_rows_of_one_setting():
    settings = ((16, 2), (32, 4), (48, 8))
    task = data.MQARMixture(seq_len=64, settings=settings, vocab_size=40)
    batch = task.sample(np.random.default_rng(0), 64)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    assert inputs.shape == targets.shape == mask.shape == (64, 64)
    assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    length_of = {kv: t for t, kv in settings}
    seen = set()
    for row in range(64):
        kv = int(mask[row].sum())          # the row's setting, by its number of queries
        t = length_of[kv]
        seen.add(kv)
        assert_mqar_row(inputs[row, :t], targets[row, :t], mask[row, :t], seq_len=t,
                        num_kv_pairs=kv, vocab_size=40)
        for array in (inputs, targets, mask):   # right padding: token 0, not counted
            np.testing.assert_array_equal(array[row, t:], 0)
    assert seen == {2, 4, 8}


def test_mqar_mixture_draws_settings_by_weight_and_seed():
    task = data.MQARMixture(seq_len=32, settings=[[16, 2], [32, 4]], weights=[3, 1],
                            vocab_size=20)             # lists, as a JSON config gives them
    assert task.settings == ((16, 2), (32, 4)) and task.weights == (3.0, 1.0)
    batch = task.sample(np.random.default_rng(0), 4000)
    assert abs(np.mean(batch["loss_mask"].sum(axis=1) == 2) - 0.75) < 0.03
    again = task.sample(np.random.default_rng(0), 4000)
    other = task.sample(np.random.default_rng(1), 4000)
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
    assert not np.array_equal(batch["inputs"], other["inputs"])
    equal = data.MQARMixture(seq_len=32, settings=((16, 2), (32, 4)), vocab_size=20)
    assert equal.weights == (1.0, 1.0)
    assert abs(np.mean(equal.sample(np.random.default_rng(0), 4000)["loss_mask"].sum(axis=1)
                       == 2) - 0.5) < 0.03


@pytest.mark.parametrize("kwargs, message", [
    ({"settings": ()}, "settings must be a non-empty sequence"),
    ({"settings": 16}, "settings must be a non-empty sequence"),
    ({"settings": ((16, 2), 32)}, r"settings\[1\]=32 must be a \(seq_len, num_kv_pairs\) pair"),
    ({"settings": ((16, 2), (15, 4))}, r"settings\[1\]=\(15, 4\): seq_len=15 must be >= 4"),
    ({"settings": ((16, 2), (16, 0))}, r"settings\[1\]=\(16, 0\): num_kv_pairs must be"),
    ({"settings": ((64, 4),)}, r"settings\[0\]=\(64, 4\) is longer than seq_len=32"),
    ({"settings": ((16, 2), (32, 4)), "weights": (1.0,)}, r"one entry per setting \(2\)"),
    ({"settings": ((16, 2), (32, 4)), "weights": (1.0, 0.0)}, r"weights\[1\]=0.0 must be"),
    ({"settings": ((16, 2), (32, 4)), "weights": (1.0, -2)}, r"weights\[1\]=-2 must be"),
    ({"settings": ((16, 2), (32, 4)), "weights": (1.0, "a")}, r"weights\[1\]='a' must be"),
    ({"settings": ((16, 2),), "vocab_size": 4}, r"settings\[0\].*vocab_size=4"),
])
def test_mqar_mixture_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.MQARMixture(**{"seq_len": 32, "vocab_size": 20, **kwargs})


def test_selective_copy_targets_are_the_data_in_order():
    task = data.SelectiveCopy(seq_len=40, num_tokens=6, vocab_size=12)
    batch = task.sample(np.random.default_rng(0), 16)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask[:, :34], 0)
    np.testing.assert_array_equal(mask[:, 34:], 1)
    np.testing.assert_array_equal(inputs[:, 34:], data.SELECTIVE_COPY_SEPARATOR)
    for row in range(16):
        region = inputs[row, :34]
        scattered = region[region != data.SELECTIVE_COPY_BLANK]
        assert len(scattered) == 6 and scattered.min() >= 2 and scattered.max() < 12
        np.testing.assert_array_equal(targets[row, 34:], scattered)


def test_task_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"seq_len=15 must be >= 4 \* num_kv_pairs"):
        data.MQAR(seq_len=15, num_kv_pairs=4, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size"):
        data.MQAR(seq_len=64, num_kv_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        data.MQAR(seq_len=64, num_kv_pairs=0, vocab_size=16)
    with pytest.raises(ValueError, match=r"seq_len=10 must be >= 2 \* num_tokens"):
        data.SelectiveCopy(seq_len=10, num_tokens=6, vocab_size=12)
    with pytest.raises(ValueError, match="vocab_size"):
        data.SelectiveCopy(seq_len=10, num_tokens=2, vocab_size=2)


def test_masked_accuracy_numpy_and_jax():
    import jax
    import jax.numpy as jnp

    targets = np.array([[1, 2, 3, 4]])
    predictions = np.array([[1, 0, 3, 0]])
    mask = np.array([[1, 1, 0, 0]], np.float32)
    assert data.masked_accuracy(predictions, targets, mask) == pytest.approx(0.5)
    logits = np.eye(5, dtype=np.float32)[predictions]  # [1, 4, 5]
    assert data.masked_accuracy(logits, targets, mask) == pytest.approx(0.5)
    jitted = jax.jit(data.masked_accuracy)
    assert float(jitted(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))) == 0.5
    assert data.masked_accuracy(predictions, targets, np.zeros_like(mask)) == 0


# ----------------------------------------------------------------------------- factory


def test_make_datasets_stdlib_with_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict({"name": "stdlib", "seq_len": 32, "batch_size": 4,
                                        "seed": 0, "max_bytes": SMALL, "eval_batches": 3})
    out = data.make_datasets(config)
    assert out.vocab_size == data.VOCAB_SIZE
    assert out.metadata["train_tokens"] + out.metadata["validation_tokens"] == SMALL
    assert 4 < out.metadata["unigram_entropy_bits"] < 6
    json.dumps(out.metadata)
    assert next(out.train)["inputs"].shape == (4, 32)
    evaluation = list(out.make_eval())
    assert len(evaluation) == 3
    np.testing.assert_array_equal(evaluation[0]["inputs"], next(out.make_eval())["inputs"])


def test_make_datasets_python_counts_documents():
    out = data.make_datasets({"name": "python", "seq_len": 32, "batch_size": 4,
                              "max_bytes": SMALL})
    corpus = data.load_python_corpus(max_bytes=SMALL)
    assert out.metadata["name"] == "python"
    assert out.metadata["documents"] == corpus.num_documents > 10
    np.testing.assert_array_equal(out.train.sampler.tokens, corpus.train)


def test_make_datasets_default_name_plain_dict_and_hosts():
    config = {"seq_len": 32, "batch_size": 4, "max_bytes": SMALL}
    out = data.make_datasets(config, process_index=1, process_count=2)
    assert out.metadata["name"] == "stdlib"
    assert next(out.train)["inputs"].shape == (2, 32)


@pytest.mark.parametrize("name, vocab_size",
                         [("mqar", 64), ("mqar_mixture", 64), ("selective_copy", 10)])
def test_make_datasets_tasks(name, vocab_size):
    config = {"name": name, "seq_len": 32, "batch_size": 4, "num_kv_pairs": 4,
              "num_tokens": 4, "settings": [[16, 2], [32, 4]], "vocab_size": vocab_size,
              "eval_batches": 2}
    out = data.make_datasets(config)
    assert out.vocab_size == vocab_size and out.metadata["name"] == name
    json.dumps(out.metadata)
    train, evaluation = next(out.train), list(out.make_eval())
    assert train["inputs"].shape == (4, 32)
    assert len(evaluation) == 2 and train["loss_mask"].sum() > 0
    assert not np.array_equal(train["inputs"], evaluation[0]["inputs"])
    np.testing.assert_array_equal(evaluation[1]["inputs"], list(out.make_eval())[1]["inputs"])


def test_make_datasets_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="name='wikitext'"):
        data.make_datasets({"name": "wikitext", "seq_len": 8, "batch_size": 2})
    with pytest.raises(ValueError, match="seq_len"):
        data.make_datasets({"name": "mqar", "batch_size": 2})
    with pytest.raises(ValueError, match="needs the field settings"):
        data.make_datasets({"name": "mqar_mixture", "seq_len": 32, "batch_size": 2})
    with pytest.raises(ValueError, match="path"):
        data.make_datasets({"name": "files", "seq_len": 8, "batch_size": 2})
    with pytest.raises(ValueError, match="batch_size"):
        data.make_datasets({"name": "selective_copy", "seq_len": 32, "batch_size": 3},
                           process_count=2)
    write_tree(tmp_path, num_files=30)
    with pytest.raises(ValueError, match="seq_len"):  # corpus smaller than one window
        data.make_datasets({"name": "files", "path": str(tmp_path / "**/*.txt"),
                            "seq_len": 100_000, "batch_size": 2, "val_fraction": 0.2})
