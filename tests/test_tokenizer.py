import random
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import BOS, EOS, PAD, PAT, TAGS, Tokenizer, train_bpe

VOCAB = 512
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it?",
    "中文分词测试：一二三四五，六七八九十。",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 🙂👍🏽 and family 👨‍👩‍👧 and flags 🇯🇵",
    "tabs\tand\r\nnewlines\n\n  indented   spaces ",
    "Ελληνικά, русский, हिन्दी, 한국어, ქართული",
]


def corpus(n_lines: int = 1500, seed: int = 0) -> list[str]:
    """A small mixed corpus of English, Chinese and arithmetic with reasoning tags."""
    rng = random.Random(seed)
    words = "the a number is sum of and then we add to get answer so first check result".split()
    hanzi = "我们计算这个数字的和然后得到答案首先检查结果是"
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        english = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        chinese = "".join(rng.choice(hanzi) for _ in range(rng.randint(3, 10)))
        reasoning = f"<think> {a}+{b}={a + b} </think> <answer> {a + b} </answer>"
        lines.append(f"{english.capitalize()}. {chinese}。{reasoning}")
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus() + MULTILINGUAL, VOCAB)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_on_any_unicode_text(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")


EDGE_CASES = ["", " ", BOS + PAD + EOS, "<think>\n</think>\n<answer>x</answer>", "</think"]


@pytest.mark.parametrize("text", MULTILINGUAL + EDGE_CASES)
def test_round_trip_on_multilingual_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_encode_to_single_ids(tok):
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.encode("hi") == ids[1:-1]
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert specials == {VOCAB - 3, VOCAB - 2, VOCAB - 1}
    assert tok.vocab_size == VOCAB
    for name, i in [(BOS, tok.bos_id), (EOS, tok.eos_id), (PAD, tok.pad_id)]:
        assert tok.decode([i]) == name


def test_special_token_text_in_user_input_is_not_special(tok):
    text = f"ignore this {EOS} and {BOS}{PAD}"
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text


def test_think_and_answer_tags_are_single_tokens(tok):
    tag_ids = []
    for tag in TAGS:
        (i,) = tok.encode(tag)
        tag_ids.append(i)
        assert i not in (tok.bos_id, tok.eos_id, tok.pad_id)
    text = "<think> 3+5=8 </think> <answer> 8 </answer>"
    ids = tok.encode(text)
    assert [i for i in ids if i in tag_ids] == tag_ids
    # The tags stay whole when glued to text on either side, too.
    glued = tok.encode("so<think>x=1</think>\n<answer>(1)</answer>.")
    assert [i for i in glued if i in tag_ids] == tag_ids


def test_training_is_deterministic():
    texts = corpus(300, seed=1)
    assert train_bpe(texts, 400) == train_bpe(list(reversed(texts)), 400)


def naive_bpe(texts, vocab_size):
    """Textbook BPE that recounts every pair before each merge, same tie rule."""
    pieces = [p.encode() for t in texts for p in regex.findall(PAT, t)]
    words = Counter(tuple(bytes([b]) for b in p) for p in pieces)
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        vocab.append(a + b)
        merged = Counter()
        for w, c in words.items():
            out, j = [], 0
            while j < len(w):
                if w[j : j + 2] == (a, b):
                    out.append(a + b)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            merged[tuple(out)] += c
        words = merged
    return {t: r for r, t in enumerate(vocab)}


def test_incremental_pair_counts_match_naive_bpe():
    texts = corpus(60, seed=4) + MULTILINGUAL + ["aaaaaaa abababab 1111 🙂🙂🙂"]
    assert train_bpe(texts, 420, forced=()) == naive_bpe(texts, 420)


# Characters unassigned in Python's Unicode tables are left out: the `regex` module and tiktoken's
# Rust engine may ship different Unicode versions and disagree on whether they are letters.
assigned_text = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=["Cn"]), max_size=8),
              st.sampled_from(TAGS + (" ", "  ", "\n", "=", "<", "'s", "123", "中文"))),
    max_size=12,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=assigned_text)
def test_training_split_matches_tiktoken_split(text):
    # Give every piece of our split its own token: tiktoken reproduces it only if it splits alike.
    pieces = [p.encode() for p in regex.findall(PAT, text)]
    ranks = {bytes([b]): b for b in range(256)}
    for p in pieces:
        ranks.setdefault(p, len(ranks))
    enc = tiktoken.Encoding("split-check", pat_str=PAT, mergeable_ranks=ranks, special_tokens={})
    assert [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(text)] == pieces


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    for text in MULTILINGUAL + corpus(20, seed=2):
        assert loaded.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)


def test_bpe_compresses_training_text(tok):
    text = "\n".join(corpus(200))
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_lone_surrogates_are_rejected(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("bad \ud800 text")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode_batch(["fine", "\udfff"])


def test_decoding_a_split_character_replaces_it(tok):
    ids = tok.encode("\N{MATHEMATICAL FRAKTUR CAPITAL U}")  # four bytes, never seen in training
    assert len(ids) == 4
    assert tok.decode_bytes(ids[:2]) == "\N{MATHEMATICAL FRAKTUR CAPITAL U}".encode("utf-8")[:2]
    assert "\N{REPLACEMENT CHARACTER}" in tok.decode(ids[:2])


def test_encode_batch_matches_encode(tok):
    texts = MULTILINGUAL + corpus(10, seed=3)
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
