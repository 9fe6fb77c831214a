"""The synthetic multi-task seq2seq suite of `milora-bench quality`, generated in-process.

Every example is `BOS <task token> x_1 .. x_n SEP` (the prompt) followed by `y_1 .. y_m EOS`
(the response), over an alphabet of `ALPHABET` symbol tokens. Everything is a pure function of
(task, seed, index): the suite is deterministic and needs no download.

Three families of tasks, each with its own task tokens:
  * pre-training skills (taught to the tiny base model, see quality_model.py): copy, reverse,
    shift by one, sort ascending;
  * the "mixed" fine-tuning suite: four NEW tasks composed from those skills, of different
    kinds (reverse-then-shift, sort descending, every other symbol, swap adjacent pairs);
  * the "interference" mix: four tasks that map the SAME input to DIFFERENT outputs (a fixed
    random permutation of the alphabet applied symbol by symbol, one permutation per task),
    told apart only by the task token. A single shared adapter must condition everything on
    that one token; per-prompt module routing is meant to help exactly here.
Held-out prompts are disjoint from training prompts (the held-out input sequences are
removed from the training stream of the same task).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIAL = ("<pad>", "<s>", "</s>", "<sep>")
ALPHABET = 16
MIN_LEN, MAX_LEN = 3, 8
PRETRAIN_TASKS = ("copy", "reverse", "shift1", "sort")
MIXED_TASKS = ("rev_shift", "sort_desc", "every_other", "swap_pairs")
INTERFERENCE_TASKS = ("perm_a", "perm_b", "perm_c", "perm_d")
ALL_TASKS = PRETRAIN_TASKS + MIXED_TASKS + INTERFERENCE_TASKS
TASK_TOKEN: Dict[str, int] = {t: len(SPECIAL) + i for i, t in enumerate(ALL_TASKS)}
SYMBOL0 = len(SPECIAL) + len(ALL_TASKS)
VOCAB_SIZE = SYMBOL0 + ALPHABET
MIXES: Dict[str, Tuple[str, ...]] = {"mixed": MIXED_TASKS, "interference": INTERFERENCE_TASKS}
MAX_PROMPT = MAX_LEN + 3          # BOS, task token, SEP
MAX_RESPONSE = MAX_LEN + 1        # EOS


def _permutations() -> Dict[str, List[int]]:
    """p_t(s) = sigma[(tau[s] + c_t) mod A] with distinct offsets c_t: for every symbol s, the four
    tasks give four different outputs (full interference)."""
    rng = random.Random(1234)  # fixed: the tasks are part of the suite's definition
    sigma, tau = list(range(ALPHABET)), list(range(ALPHABET))
    rng.shuffle(sigma)
    rng.shuffle(tau)
    offsets = rng.sample(range(1, ALPHABET), len(INTERFERENCE_TASKS))
    out = {t: [sigma[(tau[s] + c) % ALPHABET] for s in range(ALPHABET)] for t, c in zip(INTERFERENCE_TASKS, offsets)}
    return out


_PERMS = _permutations()


def _swap_pairs(x: Sequence[int]) -> List[int]:
    y = list(x)
    for i in range(0, len(y) - 1, 2):
        y[i], y[i + 1] = y[i + 1], y[i]
    return y


RULES: Dict[str, Callable[[Sequence[int]], List[int]]] = {
    "copy": lambda x: list(x),
    "reverse": lambda x: list(reversed(x)),
    "shift1": lambda x: [(s + 1) % ALPHABET for s in x],
    "sort": lambda x: sorted(x),
    "rev_shift": lambda x: [(s + 2) % ALPHABET for s in reversed(x)],
    "sort_desc": lambda x: sorted(x, reverse=True),
    "every_other": lambda x: list(x[::2]),
    "swap_pairs": _swap_pairs,
    **{t: (lambda x, p=p: [p[s] for s in x]) for t, p in _PERMS.items()},
}


@dataclass(frozen=True)
class Example:
    task: str
    prompt: Tuple[int, ...]     # token ids, BOS .. SEP
    response: Tuple[int, ...]   # token ids, .. EOS


def encode(task: str, symbols: Sequence[int]) -> Example:
    y = RULES[task](symbols)
    prompt = (BOS, TASK_TOKEN[task]) + tuple(SYMBOL0 + s for s in symbols) + (SEP,)
    return Example(task, prompt, tuple(SYMBOL0 + s for s in y) + (EOS,))


def _task_seed(task: str, seed: int, split: str) -> int:
    return (hash_str(task) * 1_000_003 + seed * 7919 + (0 if split == "train" else 1)) % (2 ** 63)


def hash_str(s: str) -> int:
    """A stable string hash (Python's hash() is salted per process)."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (2 ** 64)
    return h


def _random_symbols(rng: random.Random) -> Tuple[int, ...]:
    n = rng.randint(MIN_LEN, MAX_LEN)
    return tuple(rng.randrange(ALPHABET) for _ in range(n))


def held_out(tasks: Sequence[str], n_per_task: int, seed: int = 0) -> List[Example]:
    """n_per_task held-out examples of each task (distinct inputs), in task order."""
    out = []
    for t in tasks:
        rng = random.Random(_task_seed(t, seed, "eval"))
        seen = set()
        while len(seen) < n_per_task:
            x = _random_symbols(rng)
            if x not in seen:
                seen.add(x)
                out.append(encode(t, x))
    return out


class TrainStream:
    """An endless, deterministic stream of training batches: each batch draws its tasks
    uniformly at random and fresh inputs, skipping any input held out for that task."""

    def __init__(self, tasks: Sequence[str], seed: int, exclude: Sequence[Example] = ()) -> None:
        self.tasks = tuple(tasks)
        self.rng = random.Random(_task_seed("|".join(self.tasks), seed, "train"))
        self.exclude = {(e.task, e.prompt) for e in exclude}

    def batch(self, size: int) -> List[Example]:
        out = []
        while len(out) < size:
            t = self.tasks[self.rng.randrange(len(self.tasks))]
            e = encode(t, _random_symbols(self.rng))
            if (t, e.prompt) not in self.exclude:
                out.append(e)
        return out


def token_strings() -> List[str]:
    """One string per token id (for the tokenizer of `milora-train` tests and for printing)."""
    return list(SPECIAL) + [f"<{t}>" for t in ALL_TASKS] + [chr(ord("a") + i) for i in range(ALPHABET)]
