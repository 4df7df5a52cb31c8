"""Byte-level BPE tokenizer, trained here on our own text and served by tiktoken.

`train_bpe` learns merges as in GPT-2 (BPE of Sennrich et al. 2016, on bytes): split text into
pre-tokens with a regex, count them once, then merge the most frequent adjacent pair again and
again, recounting only where it occurred. `Tokenizer` serves those ranks through a
`tiktoken.Encoding`; `tiktoken.get_encoding` is never used (it downloads). Choices:
- GPT-4's split pattern, adapted: digits one at a time (arithmetic tasks), and the reasoning tags
  <think> </think> <answer> </answer> always whole pieces;
- the tags are ordinary text, not special tokens: training forces each into the vocabulary, so a
  tag is one id wherever it appears and the rule rewards still read it in decoded text;
- special tokens are <|begin_of_text|>, <|end_of_text|>, <|pad|>, right after the merges; their
  strings inside text encode as plain text, because model output and user text are untrusted;
- equally frequent pairs go to the smallest (left, right) bytes, so training is deterministic;
- a lone surrogate (not UTF-8 encodable) raises ValueError instead of being silently replaced, so
  decode(encode(s)) == s for every string that encode accepts.
"""

import argparse
import base64
import heapq
import json
import os
import pathlib
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex
import tiktoken

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def split_pattern(atomic: Sequence[str] = TAGS) -> str:
    """The pre-tokenizer regex, with each string of `atomic` kept as one whole piece."""
    # Backslash only true metacharacters: Rust's regex (inside tiktoken) reads \< and \> as word
    # boundaries, so re.escape's output would change meaning there.
    tags = "|".join("".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in t) for t in atomic)
    not_tag = f"(?!{tags})" if tags else ""
    pieces = [
        tags,
        r"'(?i:[sdmt]|ll|ve|re)",
        r"[^\r\n\p{L}\p{N}]?\p{L}+",
        r"\p{N}",
        # A run of punctuation stops before a tag, or "=<answer>" would swallow the "<".
        rf" ?(?:{not_tag}[^\s\p{{L}}\p{{N}}])+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
    return "|".join(p for p in pieces if p)


PAT = split_pattern(TAGS)


def train_bpe(
    texts: Iterable[str], vocab_size: int, pat: str = PAT, forced: Sequence[str] = TAGS
) -> dict[bytes, int]:
    """Learn byte-level BPE ranks: the 256 bytes as ranks 0..255, then one rank per merge.

    Every string in `forced` ends up as a single token. It is counted as a pre-token more frequent
    than any pair in the corpus, so its merges come first; it must be one whole piece under `pat`
    or it could never be seen whole when encoding. Stops early if no pair is left to merge.
    """
    if vocab_size < 256 + sum(len(s.encode("utf-8")) - 1 for s in forced):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the forced tokens")
    pretokenizer = regex.compile(pat)
    counts = Counter()
    for text in texts:
        counts.update(pretokenizer.findall(text))
    for s in forced:
        if pretokenizer.findall(s) != [s]:
            raise ValueError(f"forced token {s!r} is split by the pre-tokenizer pattern")
    total = sum(len(w.encode("utf-8")) * c for w, c in counts.items())
    for s in forced:
        counts[s] += total + 1  # more than any pair count can reach

    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes; the id is the rank
    words = [list(w.encode("utf-8")) for w in counts]  # unique pre-tokens as lists of ids
    freq = list(counts.values())

    pair_count = defaultdict(int)
    where = defaultdict(set)  # pair -> indices of words that may contain it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    # Max-heap by count, ties to the smallest bytes; stale entries are skipped when popped.
    heap = [(-c, vocab[a], vocab[b], (a, b)) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, _, _, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue
        new = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        a, b = pair
        changed = set()
        for i in where.pop(pair):
            w, out, hits, j = words[i], [], [], 0  # hits: where the pair starts in w
            while (k := _find(w, a, j)) >= 0:  # list.index scans in C; only a's are visited here
                if k + 1 < len(w) and w[k + 1] == b:
                    out += w[j:k]
                    out.append(new)
                    hits.append(k)
                    j = k + 2
                else:
                    out += w[j : k + 1]
                    j = k + 1
            if not hits:
                continue  # the pair left this word in an earlier merge
            out += w[j:]
            # Only pairs touching a merge change. In out, the r-th new token sits at hits[r] - r.
            gone = {t for k in hits for t in (k - 1, k, k + 1) if 0 <= t < len(w) - 1}
            born = {u for r, k in enumerate(hits) for u in (k - r - 1, k - r)}
            born = {u for u in born if 0 <= u < len(out) - 1}
            for t in gone:
                pair_count[w[t], w[t + 1]] -= freq[i]
                changed.add((w[t], w[t + 1]))
            for u in born:
                pair_count[out[u], out[u + 1]] += freq[i]
                changed.add((out[u], out[u + 1]))
                where[out[u], out[u + 1]].add(i)
            words[i] = out
        for p in changed:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, vocab[p[0]], vocab[p[1]], p))
            else:
                del pair_count[p]
    return {token: rank for rank, token in enumerate(vocab)}


def _find(seq: list[int], x: int, start: int) -> int:
    try:
        return seq.index(x, start)
    except ValueError:
        return -1


class Tokenizer:
    """A `tiktoken.Encoding` over our own ranks, with BOS, EOS and PAD after the merges."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str = PAT, name="r1-bpe"):
        n = len(mergeable_ranks)
        self.mergeable_ranks, self.pat_str = mergeable_ranks, pat_str
        self.special_tokens = {BOS: n, EOS: n + 1, PAD: n + 2}
        self.enc = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, extra_tokens: Sequence[str] = TAGS):
        """Train on `texts` for `vocab_size` ids in all, specials included (fewer if the text
        runs out of pairs to merge)."""
        pat = split_pattern(extra_tokens)
        return cls(train_bpe(texts, vocab_size - 3, pat, forced=extra_tokens), pat)

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD]

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`, where special-token strings are plain text; optionally framed."""
        _check_encodable(text)
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str], bos=False, eos=False) -> list[list[int]]:
        for text in texts:
            _check_encodable(text)
        batch = self.enc.encode_ordinary_batch(texts)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        # A prefix of ids can end inside a multi-byte character: show U+FFFD instead of failing.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.enc.decode_bytes(ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write a small JSON file: pattern, specials, and the ranks in order as base64."""
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        state = {
            "name": self.enc.name,
            "pat_str": self.pat_str,
            "special_tokens": self.special_tokens,
            "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
        }
        directory = os.path.dirname(os.path.abspath(path))
        # Temp file then rename, so a crash mid-write never leaves a truncated tokenizer behind.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=0)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        with open(path) as f:
            state = json.load(f)
        ranks = {base64.b64decode(t): rank for rank, t in enumerate(state["mergeable_ranks"])}
        tok = cls(ranks, state["pat_str"], state["name"])
        if tok.special_tokens != state["special_tokens"]:
            raise ValueError(f"{path}: special token ids do not follow the merges")
        return tok


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text has a lone surrogate at index {e.start}, not UTF-8") from None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train a tokenizer on text files and save it.")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default="tokenizer.json")
    args = parser.parse_args()
    texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in args.files]
    tok = Tokenizer.train(texts, args.vocab_size)
    tok.save(args.out)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    print(f"{args.out}: {tok.vocab_size} ids, {n_bytes / n_tokens:.2f} bytes per token on its text")
