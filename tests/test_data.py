import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.data import BYTE_VOCAB_SIZE, encode, load_classification_set, load_corpus


def test_builtin_corpus_is_deterministic_and_split():
    a, b = load_corpus(), load_corpus()
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train)
    assert len(a.train) > 200_000 and 0.08 < len(a.val) / (len(a.train) + len(a.val)) < 0.12
    assert b"def " in bytes(a.train[:5000].tolist())  # the tokens are the source text's bytes


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
    assert bytes(encode(text).tolist()) == text.encode("utf-8")  # one token per UTF-8 byte, so within BYTE_VOCAB_SIZE
    assert encode(text).dtype == torch.uint8 and int(encode(text).max()) < BYTE_VOCAB_SIZE


def test_user_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world, " * 200)
    corpus = load_corpus(path)
    assert corpus.source == str(path) and len(corpus.train) == 2340


def test_bad_corpora_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(IsADirectoryError, match=f"corpus path '{tmp_path}' is a directory; expected a UTF-8 text file"):
        load_corpus(tmp_path)
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"plain text " * 10_000 + b"\xff\xfe" + b"more")
    with pytest.raises(ValueError, match=r"'.*data.bin' is not UTF-8 text: invalid start byte at byte offset 110000"):
        load_corpus(binary)
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"x" * (1 << 20) + "é".encode()[:1])  # a character cut off at the very end, after a full chunk
    with pytest.raises(ValueError, match=f"unexpected end of data at byte offset {1 << 20}"):
        load_corpus(cut)
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


MEMORY_PROBE = """
import resource, sys
from utils.data import load_corpus
import torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
corpus = load_corpus(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, len(corpus.train) + len(corpus.val))
"""


def test_a_large_text_file_loads_within_twice_its_size(tmp_path):
    """Byte tokens are stored one byte each and the file is read in chunks: a 200 MB corpus needs at most
    ~400 MB. Measured here on 40 MB (peak resident memory of a fresh process, before and after loading)."""
    path = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog, naïve café\n" * 1000
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 40 << 20:
            f.write(line)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300).stdout.split()
    grown, tokens = int(out[0]), int(out[1])
    assert tokens == path.stat().st_size
    assert grown <= 2 * tokens, f"loading took {grown / tokens:.2f}x the file's size"
