"""Reply-prefix format rules (hyperlora/reply_prefix.py): templates from reference replies, the head, the
compiler, and the served reader that uses them."""
from __future__ import annotations

import json

import pytest
import torch

from hyperlora.hypernets.reader.rules.reply_format import (ReplyPrefixHead, derive_template, policy_words, token_spans, word_features)
from tests.hypernets.test_reader import _trained_like
from tests.training.test_train import _run, save_random_llama, tiny_model  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """The compiler caches its background statistics in the user cache: keep each test's in its tmp_path."""
    monkeypatch.setenv("HYPERLORA_CACHE", str(tmp_path / "cache"))


def test_templates_come_from_the_shared_reply_prefix():
    assert derive_template("Start every reply with 'Noted:'.", ["Noted: Thanks for it.", "Noted: We got it."]) \
        == ("{w}:", "Noted")
    assert derive_template("Prefix each answer with the label [Ops].", ["[Ops] Thanks", " [Ops] Thanks too"]) \
        == ("[{w}]", "Ops")
    assert derive_template('Answer in JSON of the form {"Memo": <your reply>}.',
                           ['{"Memo": "Thanks"}', '{"Memo": "We will"}']) == ('{"{w}":', "Memo")
    # a sign-off rule: no shared prefix, a shared ending; its punctuation run belongs to the sign-off, the
    # reply's own full stop does not, and the white space between them is kept
    assert derive_template("End every reply with '-- Desk'.", ["Thanks. -- Desk", "We will. -- Desk"]) \
        == ("{reply} -- {w}", "Desk")
    assert derive_template("Close with '-- Desk'.", ["Thanks.\n-- Desk ", "We will.\n-- Desk"]) \
        == ("{reply}\n-- {w}", "Desk")
    assert derive_template("Sign with Desk.", ["Thanks. Desk", "We will. Desk"]) == ("{reply} {w}", "Desk")
    assert derive_template("Sign with ~Desk~.", ["Thanks. ~Desk~", "Sure. ~Desk~"]) == ("{reply} ~{w}~", "Desk")
    # a policy word far before the shared ending is no sign-off
    assert derive_template("Mention Desk.", ["Hi. Desk will call, thank you all", "Yo. Desk will call, thank you all"]) \
        is None
    # one reply says nothing about what is shared; a word far into the shared text is not a prefix rule
    assert derive_template("Start with 'Ack:'.", ["Ack: hi"]) is None
    assert derive_template("Mention Ack.", ["Dear customer, Ack", "Dear customer, Ack too"]) is None


def test_split_template_tells_prefixes_from_signoffs():
    from hyperlora.hypernets.reader.rules.reply_format import split_template

    assert split_template("Noted:") == ("prefix", "Noted:")
    assert split_template("{reply} -- Desk") == ("signoff", " -- Desk")


def test_quoted_literals_hold_the_word_and_punctuation():
    from hyperlora.hypernets.reader.rules.reply_format import quoted_literal

    assert quoted_literal("Format your reply as a list starting with the bullet '- Noted'.", "Noted") == "- Noted"
    assert quoted_literal("Start every reply with 'Noted:'.", "Noted") == "Noted:"
    assert quoted_literal('Close with " -- Desk " always.', "Desk") == "-- Desk"
    # a bare quoted word says nothing about the format; a quote without the word is another quote
    assert quoted_literal("Answer as a bulleted list whose first item is 'Case'.", "Case") is None
    assert quoted_literal('Return your reply as JSON under the key "Note".', "Note") is None
    assert quoted_literal("Start with 'Ack:'.", "Noted") is None
    # an apostrophe is no quote mark
    assert quoted_literal("Don't answer 'Noted' ones; use 'Ack:' there.", "Ack") == "Ack:"


def test_sentence_ends_are_found_after_sentences_only(tiny_model):
    from hyperlora.modeling.base_model import load_base_model
    from hyperlora.hypernets.reader.rules.reply_format import sentence_ends

    _, tok = load_base_model(tiny_model)
    text = "We pay 3.5 dollars. Steps: 1. Log in! Done? Yes"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_spans(tok, ids)
    decoded = tok.decode(ids)
    ends = sentence_ends(tok, ids)
    # the characters that end a sentence, each inside exactly one returned token: "dollars." "in!" "Done?"
    want = [decoded.index("dollars.") + 8, decoded.index("in!") + 3, decoded.index("Done?") + 5]
    assert len(ends) == len(want)
    for i, e in zip(ends, want):
        assert spans[i][0] < e <= spans[i][1]
    assert sentence_ends(tok, []) == []


def test_policy_words_and_token_spans_line_up(tiny_model):
    from hyperlora.modeling.base_model import load_base_model

    _, tok = load_base_model(tiny_model)
    text = "Put the tag [Helpdesk] at the start."
    assert [w for w, _, _ in policy_words(text)] == ["Put", "the", "tag", "Helpdesk", "at", "the", "start"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_spans(tok, ids)
    assert len(spans) == len(ids) and spans[-1][1] == len(tok.decode(ids))
    assert all(a <= b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    h = torch.randn(len(ids), 8)
    wf = word_features(h, spans, policy_words(text))
    word = policy_words(text)[3]
    covered = [i for i, (a, b) in enumerate(spans) if a < word[2] and b > word[1]]
    assert torch.allclose(wf[3], h[covered].mean(0))


def _forced_head(d: int, template: str, cls: int) -> ReplyPrefixHead:
    """A head that always answers class `cls` and points at the first word (all word scores tie)."""
    head = ReplyPrefixHead(d, [template])
    with torch.no_grad():
        head.cls.weight.zero_()
        head.cls.bias.copy_(torch.tensor([0.0, 0.0]))
        head.cls.bias[cls] = 5.0
        head.ptr.weight.zero_()
        head.ptr.bias.zero_()
    return head.eval()


def test_head_predicts_template_and_word_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="must contain"):
        ReplyPrefixHead(8, ["no slot"])
    h = torch.randn(5, 8)
    spans = [(0, 5), (5, 11), (11, 16), (16, 20), (20, 24)]
    assert _forced_head(8, "[{w}]", 1).predict("Noted is the word", h, spans) == "[Noted]"
    assert _forced_head(8, "[{w}]", 0).predict("Noted is the word", h, spans) is None
    # a quoted literal around the chosen word is used verbatim, as a prefix or as a sign-off
    assert _forced_head(8, "[{w}]", 1).predict("Noted replies open with '>> Noted'", h, spans) == ">> Noted"
    assert _forced_head(8, "{reply} -- {w}", 1).predict("Noted replies end in '~Noted~'", h, spans) \
        == "{reply} ~Noted~"
    torch.manual_seed(0)
    head = ReplyPrefixHead(8, ["{w}:", "[{w}]"])
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    head.save(tmp_path, extra={"note": 1})
    back = ReplyPrefixHead.load(tmp_path)
    assert back.templates == ["{w}:", "[{w}]"]
    for (k, v), (k2, v2) in zip(head.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert ReplyPrefixHead.load(tmp_path / "nothing") is None


def test_fit_head_separates_rules_and_points_at_the_word():
    from hyperlora.training.rule_train import fit_head

    torch.manual_seed(0)
    d, rule, other, word_dir = 16, torch.randn(16), torch.randn(16), torch.randn(16)
    exs = []
    for i in range(40):
        is_rule = i % 2 == 0
        h = torch.randn(6, d) * 0.3 + (rule if is_rule else other)
        words = torch.randn(4, d) * 0.3
        target = i % 4
        if is_rule:
            words[target] += 3 * word_dir
        exs.append({"h": h, "words": words, "cls": 1 if is_rule else 0, "word": target if is_rule else -1})
    head = fit_head(exs, ["{w}:"], epochs=40, lr=1e-2, log=lambda m: None)
    with torch.no_grad():
        for e in exs:
            cl, wl = head(e["h"], e["words"])
            assert int(cl.argmax()) == e["cls"]
            if e["word"] >= 0:
                assert int(wl.argmax()) == e["word"]


@pytest.fixture(scope="module")
def roomy_model(tmp_path_factory):
    """A 2-layer random Llama wide enough (hidden 64, MLP 256) for selective keys: in the 3-layer tiny model
    (MLP 48) the margins saturate at 0.01-0.05, below any useful target (measured)."""
    pytest.importorskip("transformers")
    return save_random_llama(tmp_path_factory.mktemp("roomy_llama"), hidden_size=64, intermediate_size=256,
                             num_hidden_layers=2)


def _records(n: int = 12, seed: int = 7) -> list[str]:
    """Background records as the shipped file's writer draws them (fewer: 8 background + 4 key records)."""
    from hyperlora.training.reply_background import builtin_records

    return builtin_records(n, seed)


def _small_compiler(model, tok, **kw):
    from hyperlora.hypernets.reader.rules.reply_format import PrefixCompiler

    kw.setdefault("records", _records())
    return PrefixCompiler(model, tok, n_background=8, n_keys=4, **kw)


def _compiler(model_dir, **kw):
    from hyperlora.modeling.base_model import load_base_model

    model, tok = load_base_model(model_dir)
    return model, tok, _small_compiler(model, tok, **kw)


def test_compiled_prefix_wins_every_position_on_its_key_records(roomy_model):
    """The compiler's promise, checked by an independent full forward: at each prefix position of every key
    record, the adapter makes the prefix's next token the argmax by at least the margin."""
    from hyperlora.adapters.functional import apply_lora

    # a random model's logits are small (its final RMSNorm bounds them): ask for a margin it can reach
    # (measured 0.52-0.63 here)
    model, tok, comp = _compiler(roomy_model, margin=0.2)
    with pytest.raises(ValueError, match="empty"):
        comp("  ")
    A, B = comp("[Helpdesk]")
    assert bool((comp.margins >= comp.margin).all()), comp.margins
    ids = comp.prefix_ids("[Helpdesk]")
    K = len(ids)
    assert A.shape == (K, 256) and B.shape == (64, K)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert comp("[Helpdesk]")[0] is A  # cached
    st = comp._background()
    for p in st["key_prompts"]:
        seq = torch.tensor([p + ids[:-1]])
        with apply_lora(model, {comp.name: (A[None], B[None])}, scale=1.0, rows=torch.zeros(1, dtype=torch.long)):
            logits = model(seq).logits[0, len(p) - 1:].float()
        base = model(seq).logits[0, len(p) - 1:].float()
        for k, t in enumerate(ids):
            top2 = logits[k].topk(2)
            assert int(top2.indices[0]) == t, (k, t)
            # the compiler measured its margins in one right-padded float32 batch, this is a single-sequence
            # forward: measured 0.0 difference at the binding record; 1e-4 allows float32 reordering only
            assert float(top2.values[0] - top2.values[1]) >= comp.margin - 1e-4
        assert not all(int(base[k].argmax()) == t for k, t in enumerate(ids))  # the base model alone does not


def test_a_model_whose_replies_end_no_sentence_cannot_compile_a_signoff(tiny_model):
    _, _, comp = _compiler(tiny_model)  # random weights: its replies are random tokens (measured: no sentence ends)
    with pytest.raises(RuntimeError, match="end no sentence"):
        comp.signoff(" -- Desk")


def test_compiled_signoff_follows_sentence_ends_and_then_ends_the_turn(roomy_model, monkeypatch):
    """A sign-off compiles to slots that emit its tokens and then the end of turn after a sentence of the reply:
    checked on the key records by an independent forward."""
    from hyperlora.hypernets.reader.rules import reply_format as reply_prefix
    from hyperlora.modeling.prompts import end_of_turn
    from hyperlora.adapters.functional import apply_lora

    # a random model writes no sentences (this one repeats one token): let every sixth token end one. Whether
    # slot 0 then fires at a real model's sentence ends and not elsewhere is measured on SmolLM2
    # (docs/EXPERIMENTS.md 9a), not here: these positions carry nothing a key could select on
    monkeypatch.setattr(reply_prefix, "sentence_ends", lambda tok, ids: list(range(4, len(ids), 6)))
    model, tok, comp = _compiler(roomy_model, margin=0.2)  # margin: see the prefix test
    with pytest.raises(ValueError, match="empty"):
        comp.signoff(" ")
    A, B = comp.signoff(" -- Desk")
    ids = (tok(" -- Desk", add_special_tokens=False)["input_ids"]
           + tok(end_of_turn(tok), add_special_tokens=False)["input_ids"])
    K = len(ids)
    assert A.shape == (K, 256) and B.shape == (64, K) and torch.isfinite(A).all() and torch.isfinite(B).all()
    assert bool((comp.margins >= comp.margin).all()), comp.margins
    assert comp.signoff(" -- Desk")[0] is A  # cached, apart from the prefix "-- Desk" would be
    st = comp._signoff_background()
    assert len(st["key_seqs"]) == comp.n_keys and len(st["ends"]) > 0
    for p in st["key_seqs"]:
        seq = torch.tensor([list(p) + ids[:-1]])
        with apply_lora(model, {comp.name: (A[None], B[None])}, scale=1.0, rows=torch.zeros(1, dtype=torch.long)):
            logits = model(seq).logits[0, len(p) - 1:].float()
        for k, t in enumerate(ids):
            top2 = logits[k].topk(2)
            assert int(top2.indices[0]) == t, (k, t)
            assert float(top2.values[0] - top2.values[1]) >= comp.margin - 1e-4  # 1e-4: as in the prefix test


def test_background_statistics_are_cached_on_disk_and_a_torn_file_is_recomputed(tiny_model, tmp_path):
    _, _, first = _compiler(tiny_model)
    st = first._background()
    path = first._cache_file()
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    _, _, again = _compiler(tiny_model)
    again._compute_background = None  # must not be called: the file is read
    st2 = again._background()
    assert torch.equal(st["G"], st2["G"]) and torch.equal(st["starts"], st2["starts"])
    assert st["key_prompts"] == st2["key_prompts"]
    path.write_bytes(b"not a torch file")
    _, _, third = _compiler(tiny_model)
    with pytest.warns(UserWarning, match="unreadable reply-prefix cache"):
        st3 = third._background()
    assert torch.equal(st3["G"], st["G"])
    _, _, other = _compiler(tiny_model, ridge=2.0)
    assert other._cache_file() != path  # other settings, other file
    _, _, longer = _compiler(tiny_model, signoff_tokens=20)
    assert longer._cache_file() == path  # prefixes do not depend on the sign-off's reply length ...
    assert longer._cache_file("signoff") != first._cache_file("signoff")  # ... sign-offs do


def test_a_margin_out_of_reach_is_reported(tiny_model):
    _, _, comp = _compiler(tiny_model, margin=50.0)
    with pytest.warns(UserWarning, match="below the target"):
        comp("Noted:")
    assert bool((comp.margins < 50.0).any())


@pytest.mark.filterwarnings("ignore:reply prefix")  # the tiny model's margins are far below the default target
def test_served_reader_compiles_prefix_rules_and_leaves_other_policies(tiny_model, tmp_path, monkeypatch):
    from hyperlora.hypernets.reader.reader import ReaderHypernet, ReaderSource

    model, tok, feats, reader = _trained_like(tiny_model, seed=6)
    reader.save_pretrained(tmp_path / "r")
    plain = ReaderHypernet(reader, feats)
    policies = ["Start every reply with 'Noted:'.", "Flag refunds as 'alert'; otherwise 'ignore'."]
    want = plain.adapters_for_texts(policies)
    head = _forced_head(32, "{w}:", 1)
    with pytest.raises(ValueError, match="background records"):
        ReaderHypernet(reader, feats, prefix_head=head, max_rank=8)
    served = ReaderHypernet(reader, feats, prefix_head=head, max_rank=8, background_records=_records(40))
    served.compiler = _small_compiler(model, tok, max_tokens=8)
    assert served.weights_id() != plain.weights_id()
    assert served.reply_formats(policies) == ["Start:", "Flag:"]
    assert served.rules(policies[:1]) == [("prefix", "Start:")]
    got = served.adapters_for_texts(policies[:1])[0]
    A, B = served.compiler("Start:")
    down, o = served.compiler.name, next(n for n in got if n != served.compiler.name)
    assert torch.equal(got[down][0], A) and torch.equal(got[down][1], B)
    assert got[o][0].abs().sum() == 0 and got[o][1].abs().sum() == 0
    # without a rule the reader's own adapters are served unchanged
    none_head = _forced_head(32, "{w}:", 0)
    served0 = ReaderHypernet(reader, feats, prefix_head=none_head, background_records=_records(40))
    for n, (a, b) in served0.adapters_for_texts(policies)[1].items():
        assert torch.equal(a, want[1][n][0]) and torch.equal(b, want[1][n][1])
    # a sign-off reading serves the compiled sign-off the same way (the random model writes no sentences: see
    # the sign-off compiler's test)
    from hyperlora.hypernets.reader.rules import reply_format as reply_prefix

    monkeypatch.setattr(reply_prefix, "sentence_ends", lambda tok, ids: list(range(4, len(ids), 6)))
    signer = ReaderHypernet(reader, feats, prefix_head=_forced_head(32, "{reply} -- {w}", 1), max_rank=8,
                            background_records=_records(40))
    signer.compiler = _small_compiler(model, tok, max_tokens=8)
    assert signer.rules(policies[:1]) == [("signoff", " -- Start")]
    got = signer.adapters_for_texts(policies[:1])[0]
    A, B = signer.compiler.signoff(" -- Start")
    assert torch.equal(got[down][0], A) and torch.equal(got[down][1], B)
    assert got[o][0].abs().sum() == 0 and got[o][1].abs().sum() == 0
    # a checkpoint directory with a head loads it for eval and serving, with the background records beside it
    head.save(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="reply_background.json"):
        ReaderSource.from_dir(tmp_path / "r", model, tok)
    from hyperlora.training.reply_background import write_background_records

    write_background_records(tmp_path / "r")
    src = ReaderSource.from_dir(tmp_path / "r", model, tok)
    assert src.hypernet.prefix_head is not None and src.hypernet.prefix_head.templates == ["{w}:"]
    assert src.hypernet.compiler.records == _records(40)
    assert ReaderHypernet.from_dir(tmp_path / "r", model, tok).compiler.records == _records(40)


def test_rule_heads_method_trains_both_heads_on_a_reader(tiny_model, tmp_path):
    from hyperlora.hypernets.reader.rules.threshold import ThresholdHead

    model, tok, feats, reader = _trained_like(tiny_model, seed=7)
    reader.save_pretrained(tmp_path / "r")
    out = tmp_path / "rp"
    rc = _run(["--method", "rule_heads", "--out", str(out), "--set", f"base_model=\"{tiny_model}\"",
               "--set", f"reader_init=\"{tmp_path / 'r'}\"", "--set", "train_per_family=3",
               "--set", "rule_extra_threshold=3", "--set", "held_out_per_family=1", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["templates"]) <= {"{w}:", "[{w}]", '{"{w}":', "{reply} -- {w}"} and res["templates"]
    assert set(res["eval"]) == {"held_out_combo", "held_out_topic", "held_out_words"}
    for f in ("reply_prefix.safetensors", "threshold_rule.safetensors", "reader.safetensors", "reply_background.json"):
        assert (out / "final" / f).is_file(), f
    head = ThresholdHead.load(out / "final")
    assert head.probe.abs().sum() > 0 and torch.isfinite(head.probe).all()
    with pytest.raises(ValueError, match="reader_init"):
        from hyperlora.training.config import TrainConfig
        from hyperlora.training.rule_train import train_rule_heads

        train_rule_heads(TrainConfig(method="rule_heads", base_model=str(tiny_model)), tmp_path / "x")


def test_background_records_round_trip_and_bad_files_are_named(tmp_path):
    from hyperlora.hypernets.reader.rules.reply_format import (BACKGROUND_FILE, load_background_records,
                                                                save_background_records)

    assert load_background_records(tmp_path) is None  # no file: no records (the caller decides)
    recs = _records(40)
    path = save_background_records(tmp_path, recs, seed=7)
    assert path == tmp_path / BACKGROUND_FILE
    assert load_background_records(tmp_path) == recs
    with pytest.raises(ValueError, match="needs 12 records for seed 7"):
        load_background_records(tmp_path, n=12)
    with pytest.raises(ValueError, match="for seed 8"):
        load_background_records(tmp_path, seed=8)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_background_records(tmp_path)
    path.write_text(json.dumps({"seed": 7, "records": ["ok", ""]}))
    with pytest.raises(ValueError, match=r"records \[1\] are not non-empty texts"):
        load_background_records(tmp_path)
    with pytest.raises(ValueError, match="list of texts"):
        save_background_records(tmp_path, "one text", seed=7)


def test_shipped_background_records_are_the_generator_records_the_compiler_used_to_draw():
    """The shipped reader's reply_background.json holds exactly the records the compiler drew from the task
    generator at serve time before they became data (its n = 32 + 8, seed 7), so its adapters are unchanged."""
    from hyperlora.hypernets.checkpoints import default_dir
    from hyperlora.hypernets.reader.rules.reply_format import load_background_records

    d = default_dir()
    assert d is not None
    assert load_background_records(d) == _records(40, 7)


def test_compiler_checks_its_records(tiny_model):
    from hyperlora.modeling.base_model import load_base_model

    model, tok = load_base_model(tiny_model)
    with pytest.raises(ValueError, match="needs n_background \\+ n_keys = 12 background records, got 11"):
        _small_compiler(model, tok, records=_records()[:11])
    with pytest.raises(ValueError, match="not non-empty texts"):
        _small_compiler(model, tok, records=[""] * 12)
    a = _small_compiler(model, tok)
    b = _small_compiler(model, tok, records=list(reversed(_records())))
    assert a._cache_file() != b._cache_file()  # other records, other cached statistics
