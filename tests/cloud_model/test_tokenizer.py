"""ScopeTokenizer: vocabulary, round trips, zero unknowns on the published strings, batching."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cloud_model.errors import TokenizerError
from cloud_model.tokenizer import SPECIAL_TOKENS, VOCAB_VERSION, ScopeTokenizer

ROCKSALT = "1 6 a O D D a D O D b O O O c O O O d O O O e O O O 0 | 4a 4b | Na 0.5 Cl 0.5"
NATIVE = "1 4 b O O O c O O O d O O O e O O O 0 | 1a:Sr 1b:Ti 3c:O | Sr 0.2 Ti 0.2 O 0.6"


def _published(data_dir: Path) -> list[str]:
    files = ["pretrain_cloud_10k.csv", "cloud_cv_train_and_val.csv", "cloud_cv_test.csv"]
    out: list[str] = []
    for name in files:
        with (data_dir / "cloud" / name).open(newline="") as fh:
            out += [row["cloud"] for row in csv.DictReader(fh)]
    return out


def test_vocabulary_layout() -> None:
    tok = ScopeTokenizer.default()
    assert tok.tokens[:5] == SPECIAL_TOKENS
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert 300 < tok.vocab_size < 2000
    for token in [
        "|",
        "g:O",
        "O",
        "4a",
        "192l",
        "8A",
        "X",
        "Og",
        "0.0",
        "0.01",
        "0.5",
        "1.0",
        "g:j",
    ]:
        assert tok.token_to_id(token) != tok.unk_id, token
    assert tok.token_to_id("g:O") != tok.token_to_id("O")  # generator zero shift vs oxygen
    fractions = [t for t, k in zip(tok.tokens, tok.kinds, strict=True) if k == "fraction"]
    assert len(fractions) == 101 and fractions[0] == "0.0" and fractions[-1] == "1.0"


def test_round_trip_both_variants() -> None:
    tok = ScopeTokenizer.default()
    for s in (ROCKSALT, NATIVE):
        ids = tok.encode(s)
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        assert tok.decode(ids) == s
    assert tok.tokenize(NATIVE)[-14:-6] == ["|", "1a", "Sr", "1b", "Ti", "3c", "O", "|"]


def test_every_published_string_tokenizes_without_unknowns(data_dir: Path) -> None:
    tok = ScopeTokenizer.default()
    strings = _published(data_dir)
    assert len(strings) == 10000 + 1213 + 299
    assert sum(tok.count_unknown(s) for s in strings) == 0
    assert all(tok.decode(tok.encode(s)) == s for s in strings)
    # the documented edge cases are in the vocabulary
    assert any(" X " in s for s in strings) and any(" 0.0" in s for s in strings)
    assert max(len(tok.encode(s)) for s in strings) <= 64


def test_unknown_tokens_are_counted() -> None:
    tok = ScopeTokenizer.default()
    s = "1 0 0 | 1a 99z | Na 0.5 Qq 0.50"
    assert tok.count_unknown(s) == 3  # 99z, Qq, 0.50
    batch = tok.batch_encode([s, ROCKSALT])
    assert batch.n_unknown == 3
    assert int((batch.ids == tok.unk_id).sum()) == 3
    with pytest.raises(TokenizerError, match="3 parts"):
        tok.encode("1 0 0 | 1a")


def test_batch_padding_and_truncation() -> None:
    tok = ScopeTokenizer.default()
    short = "0 0 0 | 1a | Fe 1.0"
    batch = tok.batch_encode([ROCKSALT, short], max_length=64)
    n_long, n_short = len(tok.encode(ROCKSALT)), len(tok.encode(short))
    assert batch.ids.shape == (2, n_long) and batch.ids.dtype == torch.long
    assert batch.mask.dtype == torch.bool
    assert batch.mask.sum(dim=1).tolist() == [n_long, n_short]
    assert (batch.ids[1, n_short:] == tok.pad_id).all()
    assert batch.n_truncated == 0
    cut = tok.batch_encode([ROCKSALT, short], max_length=10)
    assert cut.ids.shape == (2, 10) and cut.n_truncated == 1
    assert cut.ids[0, -1].item() == tok.sep_id and cut.ids[0, 0].item() == tok.cls_id
    assert cut.ids[0, :9].tolist() == tok.encode(ROCKSALT)[:9]
    fixed = tok.batch_encode([short], max_length=64, pad_to_max_length=True)
    assert fixed.ids.shape == (1, 64) and int(fixed.mask.sum()) == n_short
    with pytest.raises(TokenizerError):
        tok.batch_encode([short], max_length=1)


def test_save_load_and_mismatch(tmp_path: Path) -> None:
    tok = ScopeTokenizer.default()
    path = tmp_path / "vocab.json"
    tok.save(path)
    loaded = ScopeTokenizer.load(path)
    assert loaded.tokens == tok.tokens and loaded.version == VOCAB_VERSION
    payload = json.loads(path.read_text())
    payload["version"] = "scope-vocab-0"
    path.write_text(json.dumps(payload))
    with pytest.raises(TokenizerError, match="version"):
        ScopeTokenizer.load(path)
    payload["version"] = VOCAB_VERSION
    payload["tokens"][10], payload["tokens"][11] = payload["tokens"][11], payload["tokens"][10]
    path.write_text(json.dumps(payload))
    with pytest.raises(TokenizerError, match="2 of its tokens differ"):
        ScopeTokenizer.load(path)
    path.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        ScopeTokenizer.load(path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
