"""Seeded, balanced prompt composer: vocabulary YAML -> `prompts.jsonl` rows.

The vocabulary (slots with weighted values, templates, exclusions, a negative prompt) is `core.vocabulary`'s YAML.
`compose` turns it into rows `{"index": i, "prompt": str, "slots": {slot: value}, "seed": s_i}`.
Rows depend only on (vocabulary, n, seed), never on the process count, and
`s_i = derive_seed(seed, i)`, so generation can split indices across any number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from itertools import combinations
from pathlib import Path

from tqdm.auto import tqdm

from core.files import write_text_atomic
from core.seeding import SEED_MASK, derive_seed
from core.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

MODES = ("balanced", "random")
ROW_KEYS = ("index", "prompt", "slots", "seed")
_MAX_BALANCE_ROUNDS = 40
_MAX_REJECTIONS = 10_000
_BAD_ROW_TRIES = 64


def compose(vocab: Vocabulary, num_prompts: int, seed: int, mode: str = "balanced") -> list[dict]:
    """Compose `num_prompts` rows `{index, prompt, slots, seed}`, deterministic from (vocab, n, seed).

    `balanced`: every slot value occurs within ±1 of n·w/Σw times (uniform weights: floor or ceil
    of n/k), value pairs across slots are spread evenly, templates are balanced, exclusions hold.
    `random`: i.i.d. weighted draws; excluded combinations are redrawn.
    """
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"data.num_prompts: must be an int >= 1, got {num_prompts!r}")
    if mode not in MODES:
        raise ValueError(f"data.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    rng = random.Random(derive_seed(seed, -1 if mode == "balanced" else -2))
    slots = list(vocab.slots)
    if mode == "balanced":
        cols, template_col = _compose_balanced(vocab, num_prompts, rng)
    else:
        cols, template_col = _compose_random(vocab, num_prompts, rng)
    rows = []
    for i in range(num_prompts):
        assign = {s: vocab.slots[s][cols[k][i]] for k, s in enumerate(slots)}
        prompt = vocab.templates[template_col[i]].format(**assign)
        rows.append(
            {"index": i, "prompt": prompt[:1].upper() + prompt[1:], "slots": assign, "seed": derive_seed(seed, i)}
        )
    return rows


def _balanced_counts(n: int, weights: list[float], rng: random.Random) -> list[int]:
    """Largest-remainder apportionment of n over weights; ties broken by a seeded shuffle."""
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = list(range(len(weights)))
    rng.shuffle(order)
    order.sort(key=lambda j: counts[j] - quotas[j])  # stable: largest remainder first
    for j in order[: n - sum(counts)]:
        counts[j] += 1
    return counts


def _balanced_column(n: int, weights: list[float], rng: random.Random) -> list[int]:
    """A shuffled column with `_balanced_counts` occurrences of each value."""
    counts = _balanced_counts(n, weights, rng)
    col = [j for j, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(col)
    return col


def _exclusion_index(vocab: Vocabulary) -> dict[tuple[int, int], list[tuple[tuple[int, int], ...]]]:
    """(slot index, value index) -> the exclusions containing it, each as ((slot, value), ...)."""
    slots = list(vocab.slots)
    index: dict[tuple[int, int], list] = {}
    for excl in vocab.exclusions:
        items = tuple((slots.index(s), vocab.slots[s].index(v)) for s, v in excl.items())
        for item in items:
            index.setdefault(item, []).append(items)
    return index


def _compose_balanced(vocab: Vocabulary, n: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """1. exact per-value counts; 2. greedy row-by-row construction; 3. exclusion repair; 4. swap pass."""
    slot_names = list(vocab.slots)
    targets = [_balanced_counts(n, vocab.weights[s], rng) for s in slot_names]
    excl = _exclusion_index(vocab)
    cols = _construct_rows(targets, n, excl, rng)
    template_col = _balanced_column(n, [1.0] * len(vocab.templates), rng)

    def ok(r: int, s: int, v: int) -> bool:  # would row r be free of exclusions with slot s set to v?
        return all(any(cols[t][r] != u for t, u in e if t != s) for e in excl.get((s, v), ()))

    _repair_exclusions(cols, excl, ok, rng, vocab)
    _balance_pairs(cols, [len(t) for t in targets], ok, rng)
    return cols, template_col


def _construct_rows(targets: list[list[int]], n: int, excl: dict, rng: random.Random) -> list[list[int]]:
    """Fill rows one by one; each slot (in a seeded order) takes, among values with count left, the one
    whose pairs with the row's already-chosen values are most under-represented so far.

    Uses exactly `targets[s][v]` rows per value. Excluded values are a last resort (repaired later).
    """
    k, sizes = len(targets), [len(t) for t in targets]
    left = [list(t) for t in targets]
    pair_counts = {(s, t): [[0] * sizes[t] for _ in range(sizes[s])] for s in range(k) for t in range(k) if s != t}
    cols = [[0] * n for _ in range(k)]
    for i in tqdm(range(n), desc="composing prompts", leave=False, disable=n < 20_000):
        frac = (i + 1) / (n * n)  # expected pair count so far = targets_s[v] * targets_t[u] * frac
        done: dict[int, int] = {}
        for s in rng.sample(range(k), k):
            m, start, best, best_v = sizes[s], rng.randrange(sizes[s]), math.inf, -1
            for v in (*range(start, m), *range(start)):
                if not left[s][v]:
                    continue
                score = sum(pair_counts[s, t][v][u] - frac * targets[s][v] * targets[t][u] for t, u in done.items())
                if any(all(t == s or done.get(t) == u for t, u in e) for e in excl.get((s, v), ())):
                    score += 1e9
                if score < best:
                    best, best_v = score, v
            cols[s][i] = best_v
            left[s][best_v] -= 1
            for t, u in done.items():
                pair_counts[s, t][best_v][u] += 1
                pair_counts[t, s][u][best_v] += 1
            done[s] = best_v
    return cols


def _repair_exclusions(cols, excl, ok, rng: random.Random, vocab: Vocabulary) -> None:
    """Swap values within a column until no row matches an exclusion; counts are unchanged."""
    n = len(cols[0])
    for r in range(n):
        while True:
            broken = next((e for s, c in enumerate(cols) for e in excl.get((s, c[r]), ()) if not ok(r, s, c[r])), None)
            if broken is None:
                break
            for s, _ in sorted(broken, key=lambda _: rng.random()):
                col, start = cols[s], rng.randrange(n)
                j = next(
                    (
                        j
                        for j in (*range(start, n), *range(start))
                        if col[j] != col[r] and ok(r, s, col[j]) and ok(j, s, col[r])
                    ),
                    None,
                )
                if j is not None:
                    col[r], col[j] = col[j], col[r]
                    break
            else:
                names = list(vocab.slots)
                combo = {names[s]: vocab.slots[names[s]][v] for s, v in broken}
                raise ValueError(
                    f"{vocab.source}: exclusions: cannot place {n} balanced prompts without {combo}; "
                    "relax exclusions or weights, or use data.mode=random"
                )


def _balance_pairs(cols: list[list[int]], sizes: list[int], ok, rng: random.Random) -> None:
    """Seeded greedy swap pass that evens out the counts of value pairs across slots.

    Objective: Σ over slot pairs (s, t) and value pairs (x, u) of (C[x, u] - E[x, u])², where C
    counts rows with s=x and t=u and E = count_s(x)·count_t(u)/n. A move swaps two rows' values
    inside one column, so per-value counts never change. For rows i, j with s-values x, y and
    t-values p != q, swapping changes the objective by 4 + 2(D[y,p] + D[x,q] - D[x,p] - D[y,q]),
    D = C - E. Each round visits every (column, row) in seeded order and proposes a random partner
    row (up to `_BAD_ROW_TRIES` partners for a row in a cell more than 1 over its expected count);
    the first improving swap that keeps exclusions is applied. Stops when a round finds none.
    """
    n, k = len(cols[0]), len(cols)
    if k < 2 or n < 2:
        return
    counts = [[0] * m for m in sizes]
    for s, c in enumerate(cols):
        for v in c:
            counts[s][v] += 1
    dev = {}  # (s, t) -> D as nested lists, both orientations, kept in sync
    for s, t in combinations(range(k), 2):
        d = [[-counts[s][x] * counts[t][u] / n for u in range(sizes[t])] for x in range(sizes[s])]
        for x, u in zip(cols[s], cols[t]):
            d[x][u] += 1
        dev[s, t] = d
        dev[t, s] = [list(row) for row in zip(*d)]
    others = [[(t, dev[s, t], dev[t, s], cols[t]) for t in range(k) if t != s] for s in range(k)]
    for _ in tqdm(range(_MAX_BALANCE_ROUNDS), desc="balancing prompt pairs", leave=False, disable=n < 20_000):
        moves = 0
        for s in rng.sample(range(k), k):
            col, other = cols[s], others[s]
            for i in rng.sample(range(n), n):
                x = col[i]
                # rows sitting in an over-full pair cell get more swap candidates
                tries = _BAD_ROW_TRIES if any(d[x][ct[i]] > 1 for _, d, _, ct in other) else 1
                for _ in range(tries):
                    j = rng.randrange(n)
                    y = col[j]
                    if x == y:
                        continue
                    delta = 0.0
                    for _, d, _, ct in other:
                        p, q = ct[i], ct[j]
                        if p != q:
                            dx, dy = d[x], d[y]
                            delta += 4 + 2 * (dy[p] + dx[q] - dx[p] - dy[q])
                    if delta >= -1e-9 or not (ok(i, s, y) and ok(j, s, x)):
                        continue
                    col[i], col[j] = y, x
                    moves += 1
                    for _, d, dt, ct in other:
                        p, q = ct[i], ct[j]
                        if p != q:
                            d[x][p] -= 1
                            d[y][q] -= 1
                            d[y][p] += 1
                            d[x][q] += 1  # noqa: E702
                            dt[p][x] -= 1
                            dt[q][y] -= 1
                            dt[p][y] += 1
                            dt[q][x] += 1  # noqa: E702
                    break
        if moves == 0:
            break


def _compose_random(vocab: Vocabulary, n: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    slot_names = list(vocab.slots)
    cum = []
    for s in slot_names:
        acc, c = 0.0, []
        for w in vocab.weights[s]:
            acc += w
            c.append(acc)
        cum.append(c)
    excl = _exclusion_index(vocab)
    cols: list[list[int]] = [[] for _ in slot_names]
    template_col = []
    for _row in range(n):
        for _ in range(_MAX_REJECTIONS):
            draw = [rng.choices(range(len(c)), cum_weights=c)[0] for c in cum]
            if not any(all(draw[t] == u for t, u in e) for s, v in enumerate(draw) for e in excl.get((s, v), ())):
                break
        else:
            raise ValueError(f"{vocab.source}: exclusions: rejected {_MAX_REJECTIONS} random draws; relax exclusions")
        for s, v in enumerate(draw):
            cols[s].append(v)
        template_col.append(rng.randrange(len(vocab.templates)))
    return cols, template_col


def _check_row(row: object, expected_index: int) -> str | None:
    """What is wrong with one prompt row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in ROW_KEYS if key not in row]
    if missing:
        return f"missing key {missing[0]!r}; rows need {', '.join(ROW_KEYS)}"
    unknown = [key for key in row if key not in ROW_KEYS]
    if unknown:
        return f"unknown key {unknown[0]!r}; rows have only {', '.join(ROW_KEYS)}"
    index, prompt, slots, seed = (row[key] for key in ROW_KEYS)
    if isinstance(index, bool) or not isinstance(index, int):
        return f"index: expected an int, got {index!r}"
    if index != expected_index:
        return f"index: expected {expected_index} (indices count up from 0 without gaps), got {index}"
    if not isinstance(prompt, str) or not prompt.strip():
        return f"prompt: expected a non-empty string, got {prompt!r}"
    if not isinstance(slots, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in slots.items()):
        return f"slots: expected a mapping of strings to strings, got {slots!r}"
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MASK:
        return f"seed: expected an int in [0, 2**63), got {seed!r}"
    return None


def write_prompts(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON lines atomically (temp file in the same folder, then `os.replace`)."""
    path = Path(path)
    for i, row in enumerate(rows):
        problem = _check_row(row, i)
        if problem:
            raise ValueError(f"rows[{i}]: {problem}")
    write_text_atomic(
        path, "".join(json.dumps({key: row[key] for key in ROW_KEYS}, ensure_ascii=False) + "\n" for row in rows)
    )


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Read and check a prompts JSONL file; errors are `ValueError("<path>:<line>: <what>")`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: prompts file not found; run `python -m distill compose RECIPE.yaml` first")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg}); one JSON object per line") from None
            problem = _check_row(row, len(rows))
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}:1: no prompts; the file is empty")
    return rows


def coverage(rows: list[dict], vocab: Vocabulary) -> dict:
    """Per-slot value counts (min/max/spread) and pair coverage for every pair of slots.

    A value pair is "allowed" unless a two-slot exclusion forbids it; `fraction` is the share of
    allowed pairs that occur at least once, `min`/`max` are counts over allowed pairs.
    """
    slot_names = list(vocab.slots)
    idx = {s: {v: j for j, v in enumerate(vocab.slots[s])} for s in slot_names}
    table = []
    for i, row in enumerate(rows):
        slots = row["slots"]
        if set(slots) != set(slot_names):
            raise ValueError(f"rows[{i}].slots: has {sorted(slots)}, vocabulary {vocab.name!r} has {slot_names}")
        for s in slot_names:
            if slots[s] not in idx[s]:
                raise ValueError(f"rows[{i}].slots.{s}: {slots[s]!r} is not in vocabulary {vocab.name!r}")
        table.append([idx[s][slots[s]] for s in slot_names])
    out: dict = {"num_prompts": len(rows), "slots": {}, "pairs": {}}
    for k, s in enumerate(slot_names):
        counts = [0] * len(vocab.slots[s])
        for r in table:
            counts[r[k]] += 1
        out["slots"][s] = {
            "counts": dict(zip(vocab.slots[s], counts)),
            "min": min(counts),
            "max": max(counts),
            "spread": max(counts) - min(counts),
            "unused": counts.count(0),
        }
    for (a, s), (b, t) in combinations(enumerate(slot_names), 2):
        forbidden = {(e[s], e[t]) for e in vocab.exclusions if set(e) == {s, t}}
        pair_counts = {(x, u): 0 for x in vocab.slots[s] for u in vocab.slots[t] if (x, u) not in forbidden}
        for r in table:
            pair_counts[vocab.slots[s][r[a]], vocab.slots[t][r[b]]] += 1
        values = list(pair_counts.values())
        covered = sum(1 for c in values if c > 0)
        out["pairs"][f"{s}|{t}"] = {
            "allowed": len(values),
            "covered": covered,
            "fraction": covered / len(values),
            "min": min(values),
            "max": max(values),
            "spread": max(values) - min(values),
        }
    return out


def format_coverage(cov: dict) -> str:
    """A short human-readable table of `coverage()` output."""
    lines = [f"coverage of {cov['num_prompts']} prompts", f"{'slot':<24}{'values':>7}{'min':>6}{'max':>6}{'spread':>8}"]
    for s, c in cov["slots"].items():
        lines.append(f"{s:<24}{len(c['counts']):>7}{c['min']:>6}{c['max']:>6}{c['spread']:>8}")
    lines.append(f"{'slot pair':<24}{'covered':>16}{'min':>6}{'max':>6}")
    for p, c in cov["pairs"].items():
        frac = f"{c['covered']}/{c['allowed']} {100 * c['fraction']:5.1f}%"
        lines.append(f"{p:<24}{frac:>16}{c['min']:>6}{c['max']:>6}")
    return "\n".join(lines)
