import pytest
import torch

from utils.data import BYTE_VOCAB_SIZE, decode, encode, load_classification_set, load_corpus


def test_builtin_corpus_is_deterministic_and_split():
    a, b = load_corpus(), load_corpus()
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train)
    assert len(a.train) > 200_000 and 0.08 < len(a.val) / (len(a.train) + len(a.val)) < 0.12
    assert "def " in decode(a.train[:5000])


def test_batches_are_next_token_pairs_and_seeded():
    corpus = load_corpus()
    x, y = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, _ = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    evals = list(corpus.eval_batches(3, 4, 16))
    assert len(evals) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(evals, corpus.eval_batches(3, 4, 16)))


def test_round_trip_utf8():
    text = "naïve café → ok"
    assert decode(encode(text)) == text
    assert int(encode(text).max()) < BYTE_VOCAB_SIZE


def test_user_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, " * 200)
    corpus = load_corpus(path)
    assert corpus.source == str(path) and len(corpus.train) == 2340


def test_bad_corpora_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(empty)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    corpus = load_corpus(short)
    with pytest.raises(ValueError, match="validation split .* has 10 tokens; expected at least seq_len \\+ 2 = 34"):
        corpus.check_fits(32)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        load_corpus(short, val_fraction=1.5)


def test_vocabulary_larger_than_the_model_is_rejected():
    with pytest.raises(ValueError, match="token id .* but the model's vocabulary is 100"):
        load_corpus().check_fits(16, model_vocab_size=100)


def test_classification_set():
    data = load_classification_set()
    x, labels = data.get_batch("train", 8, 32, torch.Generator().manual_seed(0))
    assert x.shape == (8, 32) and labels.shape == (8,) and int(labels.max()) < data.num_classes == 4
    batches = list(data.eval_batches(2, 8, 32))
    assert sorted(batches[0][1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="expected more than seq_len=100000"):
        data.check_fits(100_000)
