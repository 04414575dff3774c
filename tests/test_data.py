"""The experiment runner's data side: corpora, tokenizers, packing and step-indexed batches."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import corpora, input_pipeline, tokenizers
from experiments.corpora import DataError
from experiments.input_pipeline import batch_at, eval_batches
from experiments.tokenizers import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer

# ---------------------------------------------------------------------------
# Corpora.


@pytest.fixture(scope="module")
def stdlib_full():
    return corpora.stdlib_corpus()


def test_stdlib_split_is_deterministic_disjoint_and_nonempty(stdlib_full):
    again = corpora.stdlib_corpus()
    assert again == stdlib_full
    train, valid = stdlib_full["train"], stdlib_full["validation"]
    assert len(train) > 100 and len(valid) >= 8
    assert not set(train) & set(valid)  # by file: no document in both
    assert len(valid) < 0.1 * len(train)


def test_stdlib_excludes_tests_and_site_packages(stdlib_full):
    docs = stdlib_full["train"] + stdlib_full["validation"]
    # idlelib is left out, and so is site-packages (where flax is installed).
    assert not any("from flax import" in d for d in docs)
    assert not any("class IdleConf" in d for d in docs)


@pytest.mark.parametrize("max_bytes", [1, 5_000, 123_457])
def test_stdlib_max_bytes_cap(max_bytes):
    capped = corpora.stdlib_corpus(max_bytes=max_bytes)
    def size(docs):
        return sum(len(d.encode("utf-8")) for d in docs)
    assert size(capped["train"]) <= max_bytes
    assert capped["validation"] and size(capped["validation"]) <= max(1024, max_bytes)
    assert capped == corpora.stdlib_corpus(max_bytes=max_bytes)
    if max_bytes > 100_000:
        assert size(capped["train"]) > 0.5 * max_bytes


def test_read_text_corpus_directory_split_by_file(tmp_path):
    for i in range(40):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"document {i}\nline two of {i}\n", encoding="utf-8")
    corpus = corpora.read_text_corpus(tmp_path, validation_fraction=0.1)
    assert len(corpus["train"]) + len(corpus["validation"]) == 40
    assert corpus["validation"] and not set(corpus["train"]) & set(corpus["validation"])
    assert corpus == corpora.read_text_corpus(tmp_path, validation_fraction=0.1)


def test_read_text_corpus_single_file_splits_at_the_end(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)), encoding="utf-8")
    corpus = corpora.read_text_corpus(path, validation_fraction=0.05)
    assert corpus["train"] == ["".join(f"line {i}\n" for i in range(95))]
    assert corpus["validation"] == ["".join(f"line {i}\n" for i in range(95, 100))]


def test_read_parallel_corpus_two_files_and_tsv(tmp_path):
    (tmp_path / "a.src").write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "a.tgt").write_text("bonjour\nmonde", encoding="utf-8")
    (tmp_path / "a.tsv").write_text("hello\tbonjour\r\nworld\tmonde\r\n", encoding="utf-8")
    expected = [("hello", "bonjour"), ("world", "monde")]
    assert corpora.read_parallel_corpus(tmp_path / "a.src", tmp_path / "a.tgt") == expected
    assert corpora.read_parallel_corpus(tmp_path / "a.tsv") == expected


def _write_bad_utf8(path):
    path.write_bytes(b"first line\nsecond line\nthird \xff\xfe line\nfourth\n")
    return path


@pytest.mark.parametrize(
    "make, line",
    [
        (lambda d: corpora.read_text_corpus(_write_bad_utf8(d / "bad.txt")), 3),
        (lambda d: corpora.read_text_corpus(_write_bad_utf8(d / "sub" / "bad.txt").parent.parent), 3),
        (lambda d: corpora.read_parallel_corpus(_write_bad_utf8(d / "bad.txt")), 3),
    ],
    ids=["file", "directory", "parallel"],
)
def test_non_utf8_names_file_and_line(tmp_path, make, line):
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=rf"bad\.txt, line {line}\b.*UTF-8"):
        make(tmp_path)


def test_misaligned_parallel_files_name_both_counts(tmp_path):
    (tmp_path / "x.src").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "x.tgt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        corpora.read_parallel_corpus(tmp_path / "x.src", tmp_path / "x.tgt")
    msg = str(err.value)
    assert "x.src has 3 lines" in msg and "x.tgt has 2" in msg and "after line 2" in msg


def test_tsv_line_without_tab(tmp_path):
    (tmp_path / "p.tsv").write_text("a\tb\nc\td\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.tsv, line 3\b.*tab"):
        corpora.read_parallel_corpus(tmp_path / "p.tsv")
    (tmp_path / "q.tsv").write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.tsv, line 1\b.*found 2"):
        corpora.read_parallel_corpus(tmp_path / "q.tsv")


def test_empty_side_of_a_pair(tmp_path):
    (tmp_path / "e.src").write_text("a\n\nc\n", encoding="utf-8")
    (tmp_path / "e.tgt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.src, line 2\b.*empty"):
        corpora.read_parallel_corpus(tmp_path / "e.src", tmp_path / "e.tgt")
    (tmp_path / "e.tsv").write_text("a\tb\nc\t  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.tsv, line 2\b.*target"):
        corpora.read_parallel_corpus(tmp_path / "e.tsv")


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=r"empty\.txt, line 1\b.*empty"):
        corpora.read_text_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"empty\.txt, line 1\b.*empty"):
        corpora.read_parallel_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"emptydir.*no non-empty text files"):
        corpora.read_text_corpus(tmp_path / "emptydir")
    with pytest.raises(DataError, match=r"nope\.txt.*no such file"):
        corpora.read_text_corpus(tmp_path / "nope.txt")
    (tmp_path / "ok.src").write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nope\.tgt.*no such file"):
        corpora.read_parallel_corpus(tmp_path / "ok.src", tmp_path / "nope.tgt")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------
# The numbers task.

KNOWN = {
    0: ("zero", "零"),
    10: ("ten", "十"),
    15: ("fifteen", "十五"),
    100: ("one hundred", "一百"),
    115: ("one hundred fifteen", "一百一十五"),
    1001: ("one thousand one", "一千零一"),
    10010: ("ten thousand ten", "一万零一十"),
    40213: ("forty thousand two hundred thirteen", "四万零二百一十三"),
    100000: ("one hundred thousand", "十万"),
    999999: ("nine hundred ninety-nine thousand nine hundred ninety-nine", "九十九万九千九百九十九"),
    10010000: ("ten million ten thousand", "一千零一万"),
    100000001: ("one hundred million one", "一亿零一"),
}


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_number_words(n):
    assert corpora.number_to_english(n) == KNOWN[n][0]
    assert corpora.number_to_chinese(n) == KNOWN[n][1]


def test_numbers_task_directions_and_disjoint_splits():
    task = corpora.numbers_task("digits-en", num_train=3000, num_valid=300, seed=3)
    assert len(task["train"]) == 3000 and len(task["validation"]) == 300
    train_numbers = {int(s) for s, _ in task["train"]}
    valid_numbers = {int(s) for s, _ in task["validation"]}
    assert len(train_numbers) == 3000 and not train_numbers & valid_numbers
    assert all(t == corpora.number_to_english(int(s)) for s, t in task["train"])
    # The number words themselves (0-99) are never held out: validation tests composition.
    assert min(valid_numbers) >= 100 and set(range(100)) & train_numbers
    big = corpora.numbers_task("digits-en", num_train=20_000, num_valid=500, seed=0)
    assert set(range(100)) <= {int(s) for s, _ in big["train"]}
    assert task == corpora.numbers_task("digits-en", num_train=3000, num_valid=300, seed=3)
    assert task != corpora.numbers_task("digits-en", num_train=3000, num_valid=300, seed=4)
    en_zh = corpora.numbers_task("en-zh", num_train=3000, num_valid=300, seed=3)
    pairs = [(corpora.number_to_english(int(s)), corpora.number_to_chinese(int(s))) for s, _ in task["train"]]
    assert pairs == en_zh["train"]
    digits_en = corpora.numbers_task("en-digits", num_train=5, num_valid=5, max_value=20)
    assert all(corpora.number_to_english(int(d)) == e for e, d in digits_en["train"])
    with pytest.raises(ValueError, match="digits-zh"):
        corpora.numbers_task("en-fr")


# ---------------------------------------------------------------------------
# Tokenizers.

TRICKY = ["", "plain ascii", "héllo wörld — “quotes” 世界 😀", "  def f(x):\n\treturn x  \r\n\n", "\x00\x7f\u2028 end"]


@pytest.mark.parametrize("text", TRICKY)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size == 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([BOS_ID] + ids + [EOS_ID] + tok.encode("after eos") + [PAD_ID]) == text
    assert tok.num_bytes(text) == len(ids)


def test_byte_tokenizer_decode_replaces_cut_characters():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("世")[:2]) == "\ufffd"


@pytest.fixture(scope="module")
def sp_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    texts = corpora.stdlib_corpus(max_bytes=200_000)["train"]
    tok = tokenizers.make_tokenizer("sentencepiece", workdir, texts, vocab_size=600)
    return workdir, tok, texts


def test_sentencepiece_trains_round_trips_and_reloads(sp_workdir):
    workdir, tok, texts = sp_workdir
    assert (workdir / "tokenizer.model").is_file()
    assert tok.vocab_size == 600 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    sample = texts[0][:3000]
    for text in TRICKY + [sample]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte fallback: nothing is lost
        assert BOS_ID not in ids and EOS_ID not in ids and PAD_ID not in ids
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode("utf-8"))  # it learned something
    # A resumed run must load the saved model (texts are ignored) and get identical ids.
    again = tokenizers.make_tokenizer("sentencepiece", workdir, ["unrelated"], vocab_size=600)
    assert again.encode(sample) == tok.encode(sample)
    with pytest.raises(ValueError, match="vocab_size 600"):
        tokenizers.make_tokenizer("sentencepiece", workdir, texts, vocab_size=700)


def test_unknown_tokenizer_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(ValueError, match="'byte', 'sentencepiece'"):
        tokenizers.make_tokenizer("wordpiece", tmp_path, [], 100)


# ---------------------------------------------------------------------------
# LM packing.

DOCS = ["a", "", "hello world", "x" * 40, "tail doc", "é世"]


@pytest.fixture(scope="module")
def lm_split():
    return input_pipeline.make_lm_split(ByteTokenizer(), DOCS, seq_len=8)


def _full_batches(split, batch_size=4):
    keys = input_pipeline.LM_KEYS if "tokens" in split.arrays else input_pipeline.SEQ2SEQ_KEYS
    batches = list(eval_batches(split, batch_size))
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}


def test_packing_invariants(lm_split):
    b = _full_batches(lm_split)
    inputs, targets, w, seg, pos = (b[k] for k in input_pipeline.LM_KEYS)
    same_seg = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    # Teacher forcing: the next input is this target, inside a segment.
    assert np.all(inputs[:, 1:][same_seg] == targets[:, :-1][same_seg])
    # Segments change exactly where a document starts (BOS), or at a row start.
    changes = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
    assert np.array_equal(changes, inputs[:, 1:] == BOS_ID)
    real_rows = seg.any(axis=1)  # eval_batches pads the last batch with empty rows
    assert np.all(seg[real_rows, 0] == 1) and np.all(seg[~real_rows] == 0)
    # Positions restart at each segment and count up inside it.
    assert np.all(pos[:, 1:][same_seg] == pos[:, :-1][same_seg] + 1)
    assert np.all(pos[:, 1:][changes] == 0) and np.all(pos[:, 0] == 0)
    # No weighted target crosses into the next document or predicts BOS; padding is unweighted.
    assert np.all(targets[w == 1] != BOS_ID) and np.all(targets[w == 1] != PAD_ID)
    assert np.all(w[seg == 0] == 0)
    assert np.all(w[(targets == BOS_ID)] == 0)
    # Every document's EOS is a scored target; BOS never is.
    assert int(((targets == EOS_ID) & (w == 1)).sum()) == len(DOCS)


def test_packed_stream_reconstructs_documents(lm_split):
    b = _full_batches(lm_split)
    scored = b["targets"][b["weights"] == 1]  # row-major = stream order
    docs, current = [], []
    for tok_id in scored:
        if tok_id == EOS_ID:
            docs.append(ByteTokenizer().decode(current))
            current = []
        else:
            current.append(int(tok_id))
    assert docs == DOCS


def test_bits_per_byte_accounting(lm_split):
    assert lm_split.num_tokens == int(lm_split.arrays["weights"].sum())
    assert lm_split.num_bytes == sum(len(d.encode("utf-8")) for d in DOCS) + len(DOCS)
    # With byte tokens every scored target is one counted byte.
    assert lm_split.num_tokens == lm_split.num_bytes
    nll = 1.5 * lm_split.num_tokens
    assert input_pipeline.bits_per_byte(nll, lm_split.num_tokens, lm_split) == pytest.approx(1.5 / np.log(2))


def test_lm_datasets_from_stdlib_with_sentencepiece(sp_workdir):
    _, tok, _ = sp_workdir
    corpus = corpora.stdlib_corpus(max_bytes=20_000)
    splits = input_pipeline.make_lm_datasets(tok, corpus, seq_len=64)
    assert set(splits) == {"train", "validation"}
    for split, docs in zip(splits.values(), corpus.values()):
        assert split.arrays["tokens"].shape[1] == 65
        assert split.num_bytes == sum(len(d.encode("utf-8")) + 1 for d in docs)
        assert split.num_tokens == sum(len(tok.encode(d)) + 1 for d in docs)


# ---------------------------------------------------------------------------
# Step-indexed batches.


@pytest.fixture(scope="module")
def rows_split():
    # 23 rows whose first token identifies the row.
    n, t = 23, 5
    tokens = np.arange(n)[:, None] * 10 + np.arange(t + 1)[None, :] + 3
    arrays = {
        "tokens": tokens.astype(np.int32),
        "segment_ids": np.ones((n, t), np.int16),
        "positions": np.tile(np.arange(t, dtype=np.int16), (n, 1)),
        "weights": np.ones((n, t), np.uint8),
    }
    return input_pipeline.Split(arrays, num_examples=n, num_tokens=n * t, num_bytes=n * t)


def _row_ids(batch):
    return ((batch["inputs"][:, 0] - 3) // 10).tolist()


def test_batch_at_keys_dtypes_and_determinism(rows_split):
    b = batch_at(rows_split, step=7, batch_size=4, seed=1)
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        "inputs": (np.int32, (4, 5)),
        "targets": (np.int32, (4, 5)),
        "weights": (np.float32, (4, 5)),
        "segment_ids": (np.int32, (4, 5)),
        "positions": (np.int32, (4, 5)),
    }
    again = batch_at(rows_split, step=7, batch_size=4, seed=1)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert _row_ids(batch_at(rows_split, 8, 4, seed=1)) != _row_ids(b)
    assert _row_ids(batch_at(rows_split, 7, 4, seed=2)) != _row_ids(b)
    assert _row_ids(batch_at(rows_split, 0, 4, shuffle=False)) == [0, 1, 2, 3]
    assert _row_ids(batch_at(rows_split, 5, 4, shuffle=False)) == [20, 21, 22, 0]


@pytest.mark.parametrize("batch_size", [1, 4, 23, 7])
def test_each_epoch_visits_every_row_once(rows_split, batch_size):
    n = rows_split.num_rows
    epochs = 3
    steps = -(-epochs * n // batch_size)
    seen = [r for s in range(steps) for r in _row_ids(batch_at(rows_split, s, batch_size, seed=5))]
    orders = [seen[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_process_slices_concatenate_to_global_batch(rows_split):
    global_batch = batch_at(rows_split, 11, 8, seed=3)
    parts = [batch_at(rows_split, 11, 8, seed=3, process_index=p, process_count=4) for p in range(4)]
    for k in global_batch:
        assert np.array_equal(np.concatenate([p[k] for p in parts]), global_batch[k])
    with pytest.raises(ValueError, match="divisible"):
        batch_at(rows_split, 0, 6, process_index=0, process_count=4)


def test_eval_batches_cover_every_row_once(rows_split):
    batches = list(eval_batches(rows_split, 5))
    assert len(batches) == input_pipeline.num_eval_batches(rows_split, 5) == 5
    assert all(b["inputs"].shape == (5, 5) for b in batches)
    weighted_rows = [r for b in batches for r, w in zip(_row_ids(b), b["weights"][:, 0]) if w == 1]
    assert weighted_rows == list(range(23))
    last = batches[-1]
    assert np.all(last["weights"][3:] == 0) and np.all(last["segment_ids"][3:] == 0)
    assert sum(float(b["weights"].sum()) for b in batches) == rows_split.num_tokens
    halves = [list(eval_batches(rows_split, 6, process_index=p, process_count=2)) for p in range(2)]
    for whole, a, b in zip(eval_batches(rows_split, 6), *halves):
        assert np.array_equal(whole["inputs"], np.concatenate([a["inputs"], b["inputs"]]))


# ---------------------------------------------------------------------------
# seq2seq.


def test_seq2seq_shifting_padding_and_truncation():
    tok = ByteTokenizer()
    pairs = [("12", "twelve"), ("7", "seven"), ("123456789", "a very long target sentence")]
    split = input_pipeline.make_seq2seq_datasets(tok, tok, {"train": pairs, "validation": []}, src_len=6, tgt_len=8)
    assert set(split) == {"train"}
    split = split["train"]
    assert split.num_truncated == 1
    b = batch_at(split, 0, 3, shuffle=False)
    assert {k: v.dtype for k, v in b.items()} == {
        "src": np.int32, "tgt_inputs": np.int32, "tgt_targets": np.int32, "tgt_weights": np.float32
    }
    src, tin, tout, w = b["src"], b["tgt_inputs"], b["tgt_targets"], b["tgt_weights"]
    assert src[0].tolist() == tok.encode("12") + [EOS_ID, 0, 0, 0]
    assert src[2].tolist() == tok.encode("12345") + [EOS_ID]  # cut, still ends in EOS
    assert np.all(tin[:, 0] == BOS_ID)
    assert np.all((tin[:, 1:] == tout[:, :-1])[w[:, 1:] == 1])
    assert tout[1].tolist() == tok.encode("seven") + [EOS_ID, 0, 0]
    assert w[1].tolist() == [1] * 6 + [0] * 2
    assert tok.decode(tout[0]) == "twelve" and tok.decode(tin[2]) == "a very "
    assert np.all(tout[w == 0] == PAD_ID) and np.all(tin[w == 0] == PAD_ID)
    assert split.num_tokens == 7 + 6 + 8


def test_seq2seq_numbers_task_end_to_end():
    task = corpora.numbers_task("digits-zh", num_train=200, num_valid=20)
    tok = ByteTokenizer()
    splits = input_pipeline.make_seq2seq_datasets(tok, tok, task, src_len=8, tgt_len=40)
    assert all(s.num_truncated == 0 for s in splits.values())
    b = next(eval_batches(splits["validation"], 32))
    src, tgt = task["validation"][0]
    assert tok.decode(b["src"][0]) == src and tok.decode(b["tgt_targets"][0]) == tgt
    assert b["tgt_weights"][20:].sum() == 0


@pytest.mark.parametrize("vocab_size,match", [(100, r"smaller than required_chars\. 100 vs \d+"),
                                              (50_000, r"too high \(50000\)\. Please set it to a value <= \d+")])
def test_sentencepiece_vocab_that_does_not_fit_names_the_field(tmp_path, vocab_size, match):
    pytest.importorskip("sentencepiece")
    with pytest.raises(ValueError, match=rf"config.data.vocab_size={vocab_size} does not fit the text .*{match}"):
        tokenizers.make_tokenizer("sentencepiece", tmp_path, ["hello world, some text\n"] * 50, vocab_size=vocab_size)
