"""A seeded generator of enterprise policy tasks, split by policy.

Families (each reported on its own):
  topic       "answer 'flag' if the ticket asks to reset a password; otherwise 'pass'"
  routing     3-4 queues: two or three topics each get a queue, everything else a default queue
  conjunction topic AND record attribute (VIP / urgent / channel): both must hold
  threshold   a numeric field of an expense line / transfer / invoice ... over or under a number
  format      free text: a format rule (prefix, sign-off, tag, JSON key, bullet) checked by regex

Splits (by policy, never by example):
  train               seen topics/fields/rules, seen answer words, combinations not reserved below
  held_out_combo      seen parts in combinations reserved from training (hash of the combination)
  held_out_topic      unseen topics (topic/routing/conjunction), unseen numeric fields, unseen format rule
  held_out_words      seen topics with unseen answer words / queue names / format words

Classes are balanced per task (equal examples per option); options are listed sorted, so their order is
independent of the gold answer. Records are one line. The same record recurs under different policies
with different answers, so ignoring the policy cannot beat chance.
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

from .format import Example, PolicyTask
from .vocab import (ATTRIBUTE_PHRASES, ATTRIBUTES, CHANNEL_WORD, FIELDS, FORMAT_RULES, FORMAT_WORDS,
                    NEGATIVE_WORDS, POSITIVE_WORDS, QUEUES, TOPICS, UNSEEN_FORMAT_RULES, UNSEEN_FORMAT_WORDS,
                    UNSEEN_WORDS, NumericField, Topic)

__all__ = ["FAMILIES", "SPLITS", "generate_suite", "generate_tasks", "render_record"]

FAMILIES = ("topic", "routing", "conjunction", "threshold", "format")
SPLITS = ("train", "held_out_combo", "held_out_topic", "held_out_words")
_COMBO_FRACTION = 0.12  # share of seen-part combinations reserved for held_out_combo


def _reserved(key: str) -> bool:
    """Deterministic, seed-independent reservation of a combination for held_out_combo."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < _COMBO_FRACTION


# ---------------------------------------------------------------- records

def render_record(rng: random.Random, sentence: str, kind: str, attrs: dict[str, str]) -> str:
    """A one-line customer message or support ticket carrying the record attributes."""
    if kind == "message":
        urgent = ", marked urgent" if attrs["priority"] == "urgent" else ""
        return f"{CHANNEL_WORD[attrs['channel']]} from a {attrs['tier']} customer{urgent}: {sentence}"
    return (f"Ticket #{rng.randint(1000, 9999)} ({attrs['priority']}, {attrs['tier']}, "
            f"via {attrs['channel']}): {sentence}")


def _random_attrs(rng: random.Random, fixed: dict[str, str] | None = None, avoid: tuple[str, str] | None = None
                  ) -> dict[str, str]:
    attrs = {k: rng.choice(v) for k, v in ATTRIBUTES.items()}
    if fixed:
        attrs.update(fixed)
    if avoid is not None:
        k, v = avoid
        attrs[k] = rng.choice([x for x in ATTRIBUTES[k] if x != v])
    return attrs


def _topic_record(rng: random.Random, topic: Topic, kind: str, **attr_kw) -> str:
    return render_record(rng, rng.choice(topic.sentences), kind, _random_attrs(rng, **attr_kw))


def _format_number(field: NumericField, v: float) -> str:
    if field.money:
        return f"${v:,.2f}" if v < 100 else f"${int(round(v)):,}"
    return str(int(round(v)))


def _kind_plural(kind: str) -> str:
    return kind + "s"


# ---------------------------------------------------------------- templates

_TOPIC_TEMPLATES = (
    "Answer '{pos}' if the {kind} {desc}; otherwise answer '{neg}'.",
    "If a {kind} {desc}, reply '{pos}'. Reply '{neg}' to anything else.",
    "Label every {kind} that {desc} as '{pos}' and every other {kind} as '{neg}'.",
    "Say '{neg}' unless the {kind} {desc}, in which case say '{pos}'.",
    "Our policy: {kinds} about {noun} get '{pos}'; all others get '{neg}'.",
    "Flag {kinds} about {noun} with '{pos}' and mark the rest '{neg}'.",
)
_CONJ_TEMPLATES = (
    "Answer '{pos}' only if the {kind} {desc} and {attr}; otherwise answer '{neg}'.",
    "If a {kind} {desc} and also {attr}, reply '{pos}'. In every other case reply '{neg}'.",
    "A {kind} gets '{pos}' when it both {desc} and {attr}; anything else gets '{neg}'.",
    "Say '{neg}' unless the {kind} {attr} and {desc}; then say '{pos}'.",
)
_ROUTE_TEMPLATES = (
    "Route {kinds} about {r0} to '{q0}', about {r1} to '{q1}'{more}, and everything else to '{qd}'.",
    "Queues: '{q0}' handles {r0}; '{q1}' handles {r1}{more_semi}; '{qd}' takes all other {kinds}.",
    "Send anything about {r0} to '{q0}' and anything about {r1} to '{q1}'{more}. Otherwise use '{qd}'.",
    "Assign each {kind} to a queue: {r0} -> '{q0}', {r1} -> '{q1}'{more_arrow}, anything else -> '{qd}'.",
)
_THRESH_TEMPLATES = {
    "over": (
        "Answer '{pos}' if {desc} is over {t}; otherwise answer '{neg}'.",
        "Any {kind} where {desc} exceeds {t} gets '{pos}'; every other one gets '{neg}'.",
        "Reply '{neg}' when {desc} is {t} or less, and '{pos}' when it is higher.",
        "Mark {kinds} with {desc} above {t} as '{pos}' and the rest as '{neg}'.",
    ),
    "under": (
        "Answer '{pos}' if {desc} is under {t}; otherwise answer '{neg}'.",
        "Any {kind} where {desc} is below {t} gets '{pos}'; every other one gets '{neg}'.",
        "Reply '{neg}' when {desc} is {t} or more, and '{pos}' when it is lower.",
        "Mark {kinds} with {desc} below {t} as '{pos}' and the rest as '{neg}'.",
    ),
}
_GENERIC_REPLY = ("Thanks for writing about {noun}; we are looking into it.",
                  "We received your note about {noun} and will reply soon.",
                  "Thank you, a specialist on {noun} will follow up today.")


def _render_policy(rng: random.Random, templates: tuple[str, ...], n_paraphrases: int,
                   fill: Callable[[str], str]) -> tuple[str, list[str]]:
    order = list(templates)
    rng.shuffle(order)
    texts = [fill(t) for t in order[: 1 + n_paraphrases]]
    return texts[0], texts[1:]


def _balanced_counts(n: int, k: int) -> list[int]:
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def _mc_examples(rng: random.Random, per_answer: list[tuple[str, Callable[[], str]]], n: int,
                 options: list[str]) -> list[Example]:
    """Balanced examples: answer i gets n/k records from its record factory; shuffled."""
    counts = _balanced_counts(n, len(per_answer))
    exs = [Example(input=make(), options=list(options), answer=ans)
           for (ans, make), c in zip(per_answer, counts) for _ in range(c)]
    rng.shuffle(exs)
    return exs


# ---------------------------------------------------------------- families

def _pick_pair(rng: random.Random, unseen: bool) -> tuple[str, str]:
    pos = [w for w in POSITIVE_WORDS if (w in UNSEEN_WORDS) == unseen]
    neg = [w for w in NEGATIVE_WORDS if (w in UNSEEN_WORDS) == unseen]
    return rng.choice(pos), rng.choice(neg)


def _topics(unseen: bool) -> list[Topic]:
    return [t for t in TOPICS if (not t.seen) == unseen]


def _make_topic(rng, split, n_ex, n_par):
    ut, uw = split == "held_out_topic", split == "held_out_words"
    topic = rng.choice(_topics(ut))
    pos, neg = _pick_pair(rng, uw)
    kind = rng.choice(("message", "ticket"))
    key = f"topic|{topic.name}|{pos}|{neg}"
    others = [t for t in TOPICS if t.name != topic.name and t.seen] + ([t for t in TOPICS if not t.seen and t is not topic] if ut else [])
    policy, paras = _render_policy(rng, _TOPIC_TEMPLATES, n_par, lambda t: t.format(
        pos=pos, neg=neg, kind=kind, kinds=_kind_plural(kind), desc=topic.verb, noun=rng.choice(topic.nouns)))
    exs = _mc_examples(rng, [(pos, lambda: _topic_record(rng, topic, kind)),
                             (neg, lambda: _topic_record(rng, rng.choice(others), kind))], n_ex, sorted([pos, neg]))
    return key, policy, paras, exs


def _make_conjunction(rng, split, n_ex, n_par):
    ut, uw = split == "held_out_topic", split == "held_out_words"
    topic = rng.choice(_topics(ut))
    attr = rng.choice(sorted(ATTRIBUTE_PHRASES))
    pos, neg = _pick_pair(rng, uw)
    kind = rng.choice(("message", "ticket"))
    key = f"conj|{topic.name}|{attr[0]}={attr[1]}|{pos}|{neg}"
    others = [t for t in TOPICS if t.name != topic.name and t.seen]
    policy, paras = _render_policy(rng, _CONJ_TEMPLATES, n_par, lambda t: t.format(
        pos=pos, neg=neg, kind=kind, desc=topic.verb, attr=rng.choice(ATTRIBUTE_PHRASES[attr])))
    fixed = {attr[0]: attr[1]}

    def negative() -> str:  # near misses: right topic / wrong attribute, wrong topic / right attribute, neither
        r = rng.randrange(3)
        if r == 0:
            return _topic_record(rng, topic, kind, avoid=attr)
        if r == 1:
            return _topic_record(rng, rng.choice(others), kind, fixed=fixed)
        return _topic_record(rng, rng.choice(others), kind, avoid=attr)

    exs = _mc_examples(rng, [(pos, lambda: _topic_record(rng, topic, kind, fixed=fixed)), (neg, negative)],
                       n_ex, sorted([pos, neg]))
    return key, policy, paras, exs


def _make_routing(rng, split, n_ex, n_par):
    ut, uw = split == "held_out_topic", split == "held_out_words"
    n_q = rng.choice((3, 4))
    if ut:  # at least one unseen topic among the routed ones
        routed = [rng.choice(_topics(True))] + rng.sample(_topics(False), n_q - 2)
        rng.shuffle(routed)
    else:
        routed = rng.sample(_topics(False), n_q - 1)
    pool = [q for q in QUEUES if (q in UNSEEN_WORDS) == uw]
    queues = rng.sample(pool, n_q)
    if uw and not any(q in UNSEEN_WORDS for q in queues):  # pragma: no cover - pool is all unseen
        raise AssertionError
    kind = rng.choice(("message", "ticket"))
    key = "route|" + "|".join(f"{t.name}>{q}" for t, q in zip(routed, queues)) + f"|*>{queues[-1]}"
    routed_names = {t.name for t in routed}
    rest = [t for t in TOPICS if t.name not in routed_names and t.seen]
    nouns = [rng.choice(t.nouns) for t in routed]

    def fill(t: str) -> str:
        extra = list(zip(nouns[2:], queues[2:-1]))
        return t.format(kind=kind, kinds=_kind_plural(kind), r0=nouns[0], r1=nouns[1], q0=queues[0], q1=queues[1],
                        qd=queues[-1], more="".join(f", about {r} to '{q}'" for r, q in extra),
                        more_semi="".join(f"; '{q}' handles {r}" for r, q in extra),
                        more_arrow="".join(f", {r} -> '{q}'" for r, q in extra))

    policy, paras = _render_policy(rng, _ROUTE_TEMPLATES, n_par, fill)
    makers = [(q, (lambda t=t: _topic_record(rng, t, kind))) for t, q in zip(routed, queues)]
    makers.append((queues[-1], lambda: _topic_record(rng, rng.choice(rest), kind)))
    exs = _mc_examples(rng, makers, n_ex, sorted(queues))
    return key, policy, paras, exs


def _make_threshold(rng, split, n_ex, n_par):
    ut, uw = split == "held_out_topic", split == "held_out_words"
    field = rng.choice([f for f in FIELDS if (not f.seen) == ut])
    t = rng.choice(field.thresholds)
    direction = rng.choice(("over", "under"))
    pos, neg = _pick_pair(rng, uw)
    key = f"thresh|{field.name}|{t}|{direction}|{pos}|{neg}"
    t_text = _format_number(field, t)
    policy, paras = _render_policy(rng, _THRESH_TEMPLATES[direction], n_par, lambda s: s.format(
        pos=pos, neg=neg, desc=field.desc, t=t_text, kind=field.kind, kinds=_kind_plural(field.kind)))

    def value(above: bool) -> float:
        while True:  # keep a clear margin from the threshold so the rule, not rounding, decides
            v = t * (rng.uniform(1.2, 3.0) if above else rng.uniform(0.15, 0.8))
            if not field.money:
                v = round(v)
            if (v > t) == above and v > 0 and v != t:
                return v

    def record(above: bool) -> str:
        return field.template.format(v=_format_number(field, value(above)), x=rng.choice(field.fillers))

    exs = _mc_examples(rng, [(pos, lambda: record(direction == "over")), (neg, lambda: record(direction == "under"))],
                       n_ex, sorted([pos, neg]))
    return key, policy, paras, exs


def _make_format(rng, split, n_ex, n_par):
    ut, uw = split == "held_out_topic", split == "held_out_words"
    rule = rng.choice([k for k in FORMAT_RULES if (k in UNSEEN_FORMAT_RULES) == ut])
    word = rng.choice([w for w in FORMAT_WORDS if (w in UNSEEN_FORMAT_WORDS) == uw])
    phrasings, regex, reference = FORMAT_RULES[rule]
    key = f"format|{rule}|{word}"
    texts = [p.format(w=word) for p in phrasings]
    rng.shuffle(texts)
    policy, paras = texts[0], texts[1: 1 + n_par]
    pattern = regex.format(w=re.escape(word))
    exs = []
    for _ in range(n_ex):
        topic = rng.choice(_topics(False))
        kind = rng.choice(("message", "ticket"))
        reply = rng.choice(_GENERIC_REPLY).format(noun=topic.nouns[0])
        exs.append(Example(input=_topic_record(rng, topic, kind), answer=reference.format(w=word, r=reply),
                           check={"regex": pattern}))
    return key, policy, paras, exs


_MAKERS = {"topic": _make_topic, "routing": _make_routing, "conjunction": _make_conjunction,
           "threshold": _make_threshold, "format": _make_format}


def generate_tasks(family: str, split: str, n_tasks: int, *, seed: int = 0, examples_per_task: int = 16,
                   n_paraphrases: int = 3, exclude_keys: set[str] | None = None, strict: bool = True
                   ) -> list[PolicyTask]:
    """``n_tasks`` distinct policies of one family in one split (seeded, deterministic).

    A family with few distinct policies in a split (format rules have rule x word combinations) may run
    out: ``strict`` raises ValueError then, otherwise the distinct policies found are returned.
    """
    if family not in _MAKERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if examples_per_task < 2:
        raise ValueError(f"examples_per_task must be >= 2, got {examples_per_task}")
    rng = random.Random(f"{seed}|{family}|{split}")
    seen_keys = set(exclude_keys or ())
    tasks: list[PolicyTask] = []
    attempts = 0
    while len(tasks) < n_tasks:
        attempts += 1
        if attempts > 200 * max(n_tasks, 1):
            if not strict:
                break
            raise ValueError(f"could not find {n_tasks} distinct {family} policies for split {split!r}; "
                             f"found {len(tasks)} (ask for fewer)")
        key, policy, paras, exs = _MAKERS[family](rng, split, examples_per_task, n_paraphrases)
        if key in seen_keys:
            continue
        needs = "train" if split in ("train", "held_out_combo") else split
        if needs == "train" and _reserved(key) != (split == "held_out_combo"):
            continue
        seen_keys.add(key)
        tasks.append(PolicyTask(policy=policy, paraphrases=paras, examples=exs, family=family, split=split,
                                id=f"{family}-{split}-{seed}-{len(tasks):04d}"))
    return tasks


def generate_suite(seed: int = 0, *, train_per_family: int = 120, held_out_per_family: int = 8,
                   examples_per_task: int = 16, held_out_examples_per_task: int = 20, n_paraphrases: int = 3,
                   families: tuple[str, ...] = FAMILIES) -> dict[str, list[PolicyTask]]:
    """The full suite: ``{split: [PolicyTask]}`` over all families, split by policy.

    A family that has fewer distinct policies than asked for in a split returns all it has.
    Held-out combination policies never share their (topic, words, ...) combination with a training
    policy; the other held-out splits use topics/fields/rules or answer words no training policy uses.
    """
    suite: dict[str, list[PolicyTask]] = {}
    for split in SPLITS:
        n = train_per_family if split == "train" else held_out_per_family
        n_ex = examples_per_task if split == "train" else held_out_examples_per_task
        suite[split] = [t for fam in families
                        for t in generate_tasks(fam, split, n, seed=seed, examples_per_task=n_ex,
                                                n_paraphrases=n_paraphrases, strict=False)]
    return suite
