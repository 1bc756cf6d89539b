"""Prompt composer: determinism, balance, weights, exclusions, pair coverage, I/O and errors."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from core.seeding import derive_seed
from core.vocabulary import Vocabulary, load_vocabulary
from synth_data.composer import compose, coverage, format_coverage, read_prompts, write_prompts

WAN_YAML = Path(__file__).resolve().parent.parent / "synth_data" / "vocab" / "wan.yaml"


@pytest.fixture(scope="module")
def wan() -> Vocabulary:
    return load_vocabulary(WAN_YAML)


def small_vocab(**overrides) -> Vocabulary:
    kwargs = dict(
        name="small",
        slots={"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2", "b3"], "c": ["c0", "c1", "c2", "c3", "c4"]},
        templates=["{a} and {b} with {c}", "{c}: {b}, {a}"],
    )
    kwargs.update(overrides)
    return Vocabulary(**kwargs)


def value_counts(rows: list[dict], vocab: Vocabulary, slot: str) -> list[int]:
    counts = Counter(r["slots"][slot] for r in rows)
    return [counts[v] for v in vocab.slots[slot]]


def violates(row: dict, vocab: Vocabulary) -> bool:
    return any(all(row["slots"][s] == v for s, v in e.items()) for e in vocab.exclusions)


# --- composing -----------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent(wan):
    rows = compose(wan, 40, seed=5)
    assert rows == compose(wan, 40, seed=5)
    assert [r["prompt"] for r in rows] != [r["prompt"] for r in compose(wan, 40, seed=6)]
    assert compose(wan, 40, seed=5, mode="random") == compose(wan, 40, seed=5, mode="random")
    assert [r["index"] for r in rows] == list(range(40))
    assert [r["seed"] for r in rows] == [derive_seed(5, i) for i in range(40)]
    for r in rows:
        assert r["prompt"][0].isupper()
        assert all(v.lower() in r["prompt"].lower() for v in r["slots"].values())


@pytest.mark.parametrize("n", [1, 7, 23, 57, 130])
def test_balanced_counts_on_wan(wan, n):
    rows = compose(wan, n, seed=n)
    for slot, values in wan.slots.items():
        k = len(values)
        assert set(value_counts(rows, wan, slot)) <= {n // k, math.ceil(n / k)}, slot
    assert not any(violates(r, wan) for r in rows)


@pytest.mark.parametrize("n", [1, 2, 10, 61])
def test_balanced_counts_and_templates_on_small_vocab(n):
    vocab = small_vocab()
    rows = compose(vocab, n, seed=3)
    for slot, values in vocab.slots.items():
        assert set(value_counts(rows, vocab, slot)) <= {n // len(values), math.ceil(n / len(values))}
    used = Counter()
    for r in rows:
        texts = [t.format(**r["slots"]) for t in vocab.templates]
        matches = [i for i, t in enumerate(texts) if r["prompt"] == t[0].upper() + t[1:]]
        assert len(matches) == 1
        used[matches[0]] += 1
    assert {used[0], used[1]} <= {n // 2, math.ceil(n / 2)}


@pytest.mark.parametrize("n", [10, 37, 100])
def test_weights_respected(n):
    weights = {"a": [1.0, 2.0, 3.0], "b": [4.0, 1.0, 1.0, 2.0]}
    vocab = small_vocab(weights=weights)
    rows = compose(vocab, n, seed=0)
    for slot, w in weights.items():
        for count, wi in zip(value_counts(rows, vocab, slot), w):
            assert abs(count - n * wi / sum(w)) < 1
    assert set(value_counts(rows, vocab, "c")) <= {n // 5, math.ceil(n / 5)}


@pytest.mark.parametrize("mode", ["balanced", "random"])
def test_exclusions_always_hold(mode):
    exclusions = [
        {"a": "a0", "b": "b0"},
        {"a": "a0", "b": "b1"},
        {"b": "b2", "c": "c4"},
        {"a": "a1", "b": "b3", "c": "c0"},
    ]
    vocab = small_vocab(exclusions=exclusions)
    for seed in range(25):
        rows = compose(vocab, 60, seed=seed, mode=mode)
        assert not any(violates(r, vocab) for r in rows), seed
        if mode == "balanced":
            assert set(value_counts(rows, vocab, "a")) == {20}
            assert set(value_counts(rows, vocab, "b")) == {15}


def test_unsatisfiable_exclusions_raise():
    vocab = Vocabulary(
        name="tight",
        slots={"a": ["x", "y"], "b": ["p", "q"]},
        weights={"a": [9.0, 1.0], "b": [9.0, 1.0]},
        templates=["{a} {b}"],
        exclusions=[{"a": "x", "b": "p"}],
        source="tight.yaml",
    )
    with pytest.raises(ValueError, match=r"tight\.yaml: exclusions: cannot place 10 balanced prompts"):
        compose(vocab, 10, seed=0)
    assert not any(violates(r, vocab) for r in compose(vocab, 10, seed=0, mode="random"))


def test_balanced_pairs_beat_random(wan):
    cov_b = coverage(compose(wan, 600, seed=1), wan)
    cov_r = coverage(compose(wan, 600, seed=1, mode="random"), wan)
    for pair, b in cov_b["pairs"].items():
        r = cov_r["pairs"][pair]
        assert b["spread"] < r["spread"], pair
        assert b["fraction"] > r["fraction"], pair
        # 600 rows over 598-1682 allowed pairs: subject pairs (>1300 allowed) 0/1 each, others 0..2
        assert b["spread"] <= (1 if pair.startswith("subject|") else 2), pair
    assert max(c["spread"] for c in cov_b["slots"].values()) == 1
    assert max(c["spread"] for c in cov_r["slots"].values()) > 5


def test_num_prompts_and_mode_errors(wan):
    with pytest.raises(ValueError, match=r"data\.num_prompts: must be an int >= 1, got 0"):
        compose(wan, 0, seed=0)
    with pytest.raises(ValueError, match=r"data\.mode"):
        compose(wan, 3, seed=0, mode="uniform")


# --- seeds ---------------------------------------------------------------------------------------


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, 0) == 3202682252830578881
    assert derive_seed(42, 7) == 8457105028182875694
    seeds = {derive_seed(g, i) for g in range(3) for i in range(3000)}
    assert len(seeds) == 9000
    assert all(0 <= s < 2**63 for s in seeds)


# --- I/O -----------------------------------------------------------------------------------------


def test_write_read_round_trip(wan, tmp_path):
    rows = compose(wan, 12, seed=9)
    path = tmp_path / "out" / "prompts.jsonl"
    write_prompts(rows, path)
    assert read_prompts(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["prompts.jsonl"]  # no temp file left


def _good_line(i: int) -> dict:
    return {"index": i, "prompt": "A cat", "slots": {"subject": "a cat"}, "seed": derive_seed(0, i)}


@pytest.mark.parametrize(
    "bad_line, what",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"index": 1, "prompt": "x", "slots": {}}), "missing key 'seed'"),
        (json.dumps({**_good_line(1), "seed": "7"}), "seed: expected an int"),
        (json.dumps({**_good_line(1), "slots": ["a cat"]}), "slots: expected a mapping"),
        (json.dumps(_good_line(2)), "index: expected 1"),
    ],
)
def test_read_prompts_errors_name_line(tmp_path, bad_line, what):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(_good_line(0)) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError) as err:
        read_prompts(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert what in str(err.value)


# --- vocabulary errors ---------------------------------------------------------------------------

GOOD_YAML = """\
name: t
slots:
  subject: [a cat, a dog]
  props: [a ball, {value: a box, weight: 2.0}]
templates: ["{subject} with {props}"]
exclusions: [{subject: a cat, props: a ball}]
negative_prompt: blurry
"""


def test_load_good_yaml(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(GOOD_YAML)
    vocab = load_vocabulary(path)
    assert vocab.slots == {"subject": ["a cat", "a dog"], "props": ["a ball", "a box"]}
    assert vocab.weights == {"subject": [1.0, 1.0], "props": [1.0, 2.0]}
    assert vocab.exclusions == [{"subject": "a cat", "props": "a ball"}]
    assert vocab.negative_prompt == "blurry"


@pytest.mark.parametrize(
    "old, new, key, what",
    [
        ("negative_prompt:", "negative:", "negative", "unknown key"),
        ("[a ball, {value: a box, weight: 2.0}]", "[]", "slots.props", "no values"),
        ("[a cat, a dog]", "[a cat, a cat]", "slots.subject", "duplicate value 'a cat'"),
        ("weight: 2.0", "weight: 0", "slots.props", "weight must be > 0"),
        ('"{subject} with {props}"', '"{subject} with {prop}"', "templates[0]", "unknown slot {prop}"),
        ('"{subject} with {props}"', '"{subject} alone"', "templates[0]", "missing slot {props}"),
        ("{subject: a cat, props: a ball}", "{subjects: a cat}", "exclusions[0]", "unknown slot 'subjects'"),
        ("{subject: a cat, props: a ball}", "{subject: a cow}", "exclusions[0]", "unknown value 'a cow'"),
        ("{subject: a cat, props: a ball}", "{subject: a cat}", "exclusions", "'a cat' can never be used"),
    ],
)
def test_vocabulary_errors_name_file_and_key(tmp_path, old, new, key, what):
    assert old in GOOD_YAML
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD_YAML.replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        load_vocabulary(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert what in message and "\n" not in message


def test_exclusions_that_block_a_value_through_another_slot(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        GOOD_YAML.replace(
            "[{subject: a cat, props: a ball}]", "[{subject: a cat, props: a ball}, {subject: a cat, props: a box}]"
        )
    )
    with pytest.raises(ValueError, match=r"exclusions: slot 'subject' value 'a cat' can never be used"):
        load_vocabulary(path)


def test_missing_vocabulary_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: vocabulary file not found; pass the path")):
        load_vocabulary(path)


# --- coverage + the real vocabulary --------------------------------------------------------------


def test_coverage_counts_exactly():
    vocab = small_vocab(exclusions=[{"a": "a0", "b": "b0"}])
    rows = [
        {"index": 0, "prompt": "p", "slots": {"a": "a0", "b": "b1", "c": "c0"}, "seed": 1},
        {"index": 1, "prompt": "p", "slots": {"a": "a0", "b": "b1", "c": "c1"}, "seed": 2},
        {"index": 2, "prompt": "p", "slots": {"a": "a2", "b": "b3", "c": "c1"}, "seed": 3},
    ]
    cov = coverage(rows, vocab)
    assert cov["slots"]["a"]["counts"] == {"a0": 2, "a1": 0, "a2": 1}
    assert (cov["slots"]["a"]["min"], cov["slots"]["a"]["max"], cov["slots"]["a"]["spread"]) == (0, 2, 2)
    ab = cov["pairs"]["a|b"]
    assert (ab["allowed"], ab["covered"], ab["max"]) == (11, 2, 2)  # 12 pairs, one excluded
    assert ab["fraction"] == pytest.approx(2 / 11)
    assert cov["pairs"]["b|c"]["covered"] == 3
    text = format_coverage(cov)
    assert "a|b" in text and "2/11" in text and "3 prompts" in text
    with pytest.raises(ValueError, match=r"rows\[0\]\.slots\.a: 'zz'"):
        coverage([{**rows[0], "slots": {"a": "zz", "b": "b0", "c": "c0"}}], vocab)


def test_wan_vocabulary_is_rich(wan):
    assert list(wan.slots) == ["subject", "clothing", "props", "action", "background"]
    assert all(len(values) >= 20 for values in wan.slots.values())
    subjects = " ".join(wan.slots["subject"])
    for word in ("baby", "toddler", "teenage", "elderly", "wheelchair", "cat", "cow", "parrot", "goldfish", "bee"):
        assert word in subjects, word
    assert "worst quality" in wan.negative_prompt
    assert wan.exclusions
    assert len(set(wan.templates)) == len(wan.templates) >= 3
