"""Seeded RULER-style task generators, sized in tokens with the model's own tokenizer.

Every sample is split into ``prefix_ids`` (chat header + instructions + context) and
``question_ids`` (question, end of the user turn, assistant header, answer prefix), so
that the question-agnostic mode can compress the prefix alone and feed the question
afterwards (see ``engine.py``). ``len(prefix_ids) + len(question_ids) <= context``.

Tasks (after RULER, Hsieh et al. 2024, generators rewritten here):

- ``niah_single``: one needle "One of the special magic numbers for KEY is: N." in essays.
- ``niah_multikey``: four needles with different keys; one is asked (three distractors).
- ``niah_multivalue``: four needles with the same key; all four numbers are asked.
- ``niah_multiquery``: four needles with different keys; two of them are asked.
- ``vt``: variable tracking, one chain ``VAR A = N, VAR B = VAR A, ...`` (4 hops) in
  repeated noise sentences; all 5 names are asked.
- ``cwe``: common-words extraction: a numbered word list where 10 words appear 30 times
  (fewer below 4k tokens: ``context // 136``, at least 6) and the others 3 times; the 10
  frequent ones are asked.

A sample is correct when every expected string occurs in the generated answer
(numbers as digit strings, words as whole words, case-insensitive): exact match of the
answer set, all-or-nothing (stricter than RULER's partial-credit ``string_match_all``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .data import essay_sentences, word_lists

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                          "vt", "cwe")

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the numbers afterwards.")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
            "There and back again.")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.")


@dataclass(frozen=True)
class Sample:
    """One prompt: what is compressed, what is asked, what must be in the answer."""

    task: str
    context: int
    index: int
    prefix_ids: list[int] = field(repr=False)
    question_ids: list[int] = field(repr=False)
    answers: tuple[str, ...]
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prefix_ids) + len(self.question_ids)


def is_correct(task: str, answers: Sequence[str], output: str) -> bool:
    """All expected strings present in ``output`` (words: whole-word, case-insensitive)."""
    text = output.lower()
    for ans in answers:
        a = re.escape(ans.lower())
        if not re.search(rf"(?<![0-9a-z]){a}(?![0-9a-z])", text):
            return False
    return True


class Builder:
    """Turns (intro, context pieces, question) into token ids of a target length."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._cache: dict[str, int] = {}

    def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.tok(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = n
        return n

    def encode(self, intro: str, context: str, question: str,
               answer_prefix: str) -> tuple[list[int], list[int]]:
        """Chat-formatted ids split at the question: ``(prefix_ids, question_ids)``."""
        marker = "\x00QUESTION\x00"
        content = f"{intro}\n\n{context}\n\n{marker}"
        text = self.tok.apply_chat_template([{"role": "user", "content": content}],
                                            tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        # One tokenization of the whole prompt, cut at the first token starting at the
        # question: the halves concatenate to the canonical ids (tokenizing them apart
        # would merge the trailing newlines differently).
        enc = self.tok(head + question + tail + answer_prefix, add_special_tokens=False,
                       return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        cut = next(i for i, (start, _end) in enumerate(offsets) if start >= len(head))
        return ids[:cut], ids[cut:]

    def fit(self, target: int, make: Callable[[int], tuple[str, str, str, str]],
            hi: int) -> tuple[list[int], list[int], int]:
        """Largest ``n`` in [1, hi] with ``make(n)`` encoding to <= target tokens."""
        lo, best, probe = 1, None, 16
        while probe < hi:  # doubling first: never tokenize far more than the target
            p, q = self.encode(*make(probe))
            if len(p) + len(q) > target:
                hi = probe
                break
            best, lo, probe = (p, q, probe), probe + 1, probe * 2
        while lo <= hi:
            mid = (lo + hi) // 2
            p, q = self.encode(*make(mid))
            if len(p) + len(q) <= target:
                best, lo = (p, q, mid), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError(f"context {target} too short for this task")
        return best


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, n: int) -> list[str]:
    words = word_lists()
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(words['adjective'])}-{rng.choice(words['noun'])}")
    # Shuffle from sorted order: a set's order follows the process's string hashing
    # (PYTHONHASHSEED), and would change which key is asked from one run to the next.
    return sorted(sorted(keys), key=lambda k: rng.random())


def _haystack_with(rng: random.Random, needles: list[str], filler: list[str],
                   n: int) -> str:
    """First ``n`` filler sentences (from a seeded start) with needles at seeded depths."""
    start = rng.randrange(len(filler))
    sents = [filler[(start + i) % len(filler)] for i in range(n)]
    depths = sorted(rng.randint(0, len(sents)) for _ in needles)
    for offset, (depth, needle) in enumerate(zip(depths, needles, strict=True)):
        sents.insert(depth + offset, needle)
    return " ".join(sents)


def _niah(b: Builder, rng: random.Random, target: int, task: str):
    sents = list(essay_sentences())
    if task == "niah_single":
        keys = _keys(rng, 1)
        pairs, asked = [(keys[0], _number(rng))], keys[:1]
    elif task == "niah_multikey":
        keys = _keys(rng, 4)
        pairs, asked = [(k, _number(rng)) for k in keys], keys[:1]
    elif task == "niah_multivalue":
        key = _keys(rng, 1)[0]
        pairs, asked = [(key, _number(rng)) for _ in range(4)], [key]
    else:  # niah_multiquery
        keys = _keys(rng, 4)
        pairs, asked = [(k, _number(rng)) for k in keys], keys[:2]
    rng.shuffle(pairs)
    needles = [NEEDLE.format(key=k, value=v) for k, v in pairs]
    answers = tuple(v for k, v in pairs if k in asked)
    what = " and ".join(asked)
    if len(answers) == 1:
        question = f"What is the special magic number for {what} mentioned in the provided text?"
        prefix = f"The special magic number for {what} mentioned in the provided text is"
    else:
        question = (f"What are all the special magic numbers for {what} mentioned in the "
                    f"provided text?")
        prefix = f"The special magic numbers for {what} mentioned in the provided text are"
    seed = rng.random()

    def make(n: int):
        r = random.Random(seed)
        return NIAH_INTRO, _haystack_with(r, needles, sents, n), question, " " + prefix

    return make, len(sents), answers, 10 * len(answers) + 4  # 7 digits, space, separators


def _vt(b: Builder, rng: random.Random, target: int):
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    ]
    question = (f"Question: Find all variables that are assigned the value {value} in the "
                "text above.")
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, "
              f"{len(names)} variables are assigned the value {value}, they are:")
    seed = rng.random()

    def make(n: int):
        r = random.Random(seed)
        filler = [VT_NOISE] * n
        # keep the chain in order: sorted depths preserve the insertion order
        return VT_INTRO, _haystack_with(r, chain, filler, n), question, prefix

    return make, target // 10, tuple(names), 48


def _cwe(b: Builder, rng: random.Random, target: int):
    nouns = list(word_lists()["noun"])
    pool = rng.sample(nouns, 10 + 4000)
    common, rare = pool[:10], pool[10:]
    freq = min(30, max(6, target // 136))  # 30 from 4k tokens on (RULER); fewer below
    question = "Question: What are the 10 most common words in the above list?"
    prefix = " Answer: The top 10 words that appear most often in the list are:"
    seed = rng.random()

    def make(n: int):
        r = random.Random(seed)
        words = common * freq + rare[:n] * 3
        r.shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return CWE_INTRO, listing, question, prefix

    return make, len(rare), tuple(common), 96


def make_sample(tokenizer, task: str, context: int, index: int, seed: int = 0,
                builder: Builder | None = None) -> Sample:
    """Sample ``index`` of ``task`` at ``context`` tokens; same arguments, same sample."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    b = builder or Builder(tokenizer)
    rng = random.Random(f"{task}/{context}/{index}/{seed}")
    if task.startswith("niah"):
        make, hi, answers, max_tokens = _niah(b, rng, context, task)
    elif task == "vt":
        make, hi, answers, max_tokens = _vt(b, rng, context)
    else:
        make, hi, answers, max_tokens = _cwe(b, rng, context)
    prefix_ids, question_ids, _ = b.fit(context, make, hi)
    return Sample(task=task, context=context, index=index, prefix_ids=prefix_ids,
                  question_ids=question_ids, answers=answers, max_tokens=max_tokens)
