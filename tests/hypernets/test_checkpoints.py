"""The shipped hypernetwork loads against the embedded default model and writes real adapters."""
import pytest
import torch


@pytest.mark.slow
def test_shipped_hypernet_loads_and_generates_policy_dependent_adapters():
    import hyperlora
    from hyperlora.hypernets.checkpoints import default_dir, load
    from hyperlora.modeling.base_model import load_base_model

    if default_dir() is None:
        pytest.fail("no hypernetwork is shipped in hyperlora/checkpoints/ (the demo needs one)")
    model, tok = load_base_model()
    hypernet, encode = load(model, tok)
    policies = ["Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'.",
                "Answer 'review' if the expense amount is over $500; otherwise answer 'approve'."]
    if getattr(hypernet, "reads_text", False):  # a policy reader (hyperlora/reader.py): texts in, per-policy ranks
        per = hypernet.adapters_for_texts(policies)
        for name in per[0]:
            (a0, b0), (a1, b1) = per[0][name], per[1][name]
            for t in (a0, b0, a1, b1):
                assert torch.isfinite(t).all()
            assert b0.abs().sum() > 0, "a trained reader must not write zero adapters"
            assert b0.shape != b1.shape or not torch.equal(b0 @ a0, b1 @ a1), "different policies, same adapter"
    else:
        with torch.no_grad():
            gen = hypernet.generate(encode(policies).float())
        for a, b in gen.values():
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            assert b.abs().sum() > 0, "a trained hypernetwork must not write zero adapters"
            assert not torch.equal(b[0], b[1]), "different policies must give different adapters"
    rt = hyperlora.attach(model, hypernet, encoder=encode, max_adapters=4, max_rank=hypernet.config.rank)
    try:
        # only the modules the hypernetwork writes are wrapped (it covers a subset of layers)
        assert sorted(rt.target_names) == sorted(hypernet.targets())
        wrapped = [n for n, m in model.named_modules() if type(m).__name__.startswith("Lora")]
        assert sorted(wrapped) == sorted(hypernet.targets())
        ids = tok(["hello there"], return_tensors="pt").input_ids
        with rt.policies([policies[0]]):
            with_adapter = model(input_ids=ids).logits
        with rt.policies([None]):
            base = model(input_ids=ids).logits
        assert not torch.equal(with_adapter, base)
    finally:
        rt.detach()


@pytest.mark.slow
def test_shipped_reader_reads_a_rule_after_token_200():
    # issue 19 row 12: the reader read only a policy's first 96 tokens, so a rule after token 223 moved the
    # adapter by at most 0.30 (Frobenius), against 52-58 for the same change inside the window
    from hyperlora.hypernets.checkpoints import default_dir, load
    from hyperlora.modeling.base_model import load_base_model

    model, tok = load_base_model()
    hypernet, _ = load(model, tok, default_dir())
    preamble = ("This policy applies to every message that reaches the customer operations desk, whether it comes "
                "by email, chat, phone transcript or web form, and whatever language it is written in. Agents "
                "read the whole message before deciding, including quoted text and attachments' descriptions. ")
    preamble = preamble * 4
    assert len(tok(preamble, add_special_tokens=False)["input_ids"]) > 200
    rule_a = "Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'."
    rule_b = "Answer 'refund' if the customer asks for their money back; otherwise answer 'ignore'."

    def delta(text):
        mods = hypernet.adapters_for_texts([text])[0]
        return {n: b @ a for n, (a, b) in mods.items()}

    def moved(x, y):
        return sum(float((x[n] - y[n]).norm()) for n in x)

    short = moved(delta(rule_a), delta(rule_b))
    long = moved(delta(preamble + rule_a), delta(preamble + rule_b))
    assert long > 0.25 * short, (long, short)
