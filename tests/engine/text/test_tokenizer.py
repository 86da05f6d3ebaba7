"""test_tokenizer.py — the engine's SentencePiece shim against Debian's python3-sentencepiece on
the tiny model's tokenizer.model: encode (digits, whitespace runs, newlines, emoji, byte
fallback), decode, the piece table (piece, score, type) the GGUF exporter reads, and the
Hugging Face style encode that turns literal special pieces into their ids."""
import re

import pytest
import sentencepiece as spm

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), ".."))  # enginetool.py
from enginetool import TINY_TOKENIZER, ids_of, run  # noqa: E402

sp = spm.SentencePieceProcessor(model_file=TINY_TOKENIZER)

TEXTS = [
    "Hello world",
    "The year 2025 has 365 days; pi = 3.14159",
    "1234567890 0 00 007",
    "two  spaces, three   spaces,\ttab,\t\ttwo tabs",
    "    leading and trailing    ",
    "line one\nline two\n\nafter a blank line\r\nwindows",
    "\n\n\n",
    "emoji 🙂😀🚀 and 👩‍👩‍👧 family",
    "héllo wörld — ñ, ç, ß, Ω",
    "世界 こんにちは 안녕하세요",
    "rare: \u0007\u001b control bytes, \U0001f9ec dna, \u2603 snowman, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n    return x * 2  # comment\n",
    "",
    " ",
    "<start_of_turn> written as text",
]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_sentencepiece(text):
    want = sp.encode(text)
    got = ids_of(run("tokenize", TINY_TOKENIZER, stdin=text.encode()))
    assert got == want


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_matches_sentencepiece(text):
    ids = sp.encode(text)
    got = run("decode", TINY_TOKENIZER, ",".join(map(str, ids))).stdout.decode()
    assert got == sp.decode(ids)


def test_byte_fallback_is_exercised():
    ids = sp.encode("\u0007\U0001f9ec")
    assert any(sp.is_byte(i) for i in ids), "the test text must need byte pieces"


def test_piece_table():
    lines = run("pieces", TINY_TOKENIZER).stdout.decode().splitlines()
    assert len(lines) == sp.get_piece_size()
    for line in lines:
        i, typ, score, hexpiece = line.split("\t")
        i, typ = int(i), int(typ)
        assert bytes.fromhex(hexpiece).decode() == sp.id_to_piece(i), i
        assert abs(float(score) - sp.get_score(i)) <= 1e-6 * max(1.0, abs(sp.get_score(i))), i
        want = 1
        if sp.is_unknown(i):
            want = 2
        elif sp.is_control(i):
            want = 3
        elif sp.is_unused(i):
            want = 5
        elif sp.is_byte(i):
            want = 6
        if want == 1:
            assert typ in (1, 4), (i, typ)  # normal or user-defined (python cannot tell them apart)
        else:
            assert typ == want, (i, typ, want)


def split_special(text):
    """Hugging Face style: every control/user-defined piece written in the text is its id."""
    specials = {}
    for i in range(sp.get_piece_size()):
        p = sp.id_to_piece(i)
        # control pieces, and user-defined ones (which SentencePiece encodes as one id)
        if sp.is_control(i) or (len(p) > 1 and not sp.is_byte(i) and sp.encode(p) == [i]
                                and p.startswith("<") and p.endswith(">")):
            specials[p] = i
    pat = re.compile("|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True)))
    out, pos = [], 0
    for m in pat.finditer(text):
        if m.start() > pos:
            out += sp.encode(text[pos:m.start()])
        out.append(specials[m.group(0)])
        pos = m.end()
    if pos < len(text):
        out += sp.encode(text[pos:])
    return out


@pytest.mark.parametrize("text", [
    "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "no specials at all",
    "<eos>text<pad><pad>",
])
def test_encode_special(text):
    got = ids_of(run("tokenize", TINY_TOKENIZER, "special", stdin=text.encode()))
    assert got == split_special(text)
    assert sp.piece_to_id("<start_of_turn>") in got or "<start_of_turn>" not in text
