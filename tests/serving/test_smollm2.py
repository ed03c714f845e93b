"""The default `hyperlora serve` (embedded SmolLM2-135M-Instruct + the shipped policy reader) end to end with the
`openai` client: concurrent mixed-policy replies equal each request alone, token for token, and a policy
changes the reply with no policy text in the prompt."""
from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from serve_helpers import ServerProcess

POLICIES = [None,
            "Answer 'escalate' if the ticket reports a security vulnerability; otherwise answer 'close'.",
            "Route messages about refunds to 'billing', about password resets to 'accounts', and everything else to "
            "'support'.",
            "Answer 'review' if the expense amount is over $500; otherwise answer 'approve'.",
            "Start every reply with 'Noted:'.",
            "End every reply with the sign-off '-- Care'."]
RECORDS = ["Ticket #4821: I can see another customer's orders by changing the URL.",
           "Email from a standard customer: Please refund the blender I returned.",
           "Expense line: conference ticket, $1,240.",
           "Chat message from a VIP customer: My package is a week late."]


@pytest.mark.slow
def test_default_server_mixed_policies_concurrent_equal_alone():
    srv = ServerProcess(["--threads", "2", "--max-batch", "8"]).wait_ready(timeout=600)
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=600)
        model = c.models.list().data[0].id
        jobs = [(p, RECORDS[i % len(RECORDS)]) for i, p in enumerate(POLICIES)]

        def ask(job):
            pol, rec = job
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": rec}], max_tokens=20,
                                          temperature=0, extra_body={"return_token_ids": True,
                                                                     **({"policy": pol} if pol else {})})
            return r.choices[0].model_extra["token_ids"], r.choices[0].message.content

        alone = [ask(j) for j in jobs]
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(ask, jobs))
        assert [t for t, _ in together] == [t for t, _ in alone]
        replies = dict(zip(POLICIES, (txt for _, txt in alone)))
        assert replies[POLICIES[4]].startswith("Noted:"), replies
        base_same_record = ask((None, jobs[4][1]))[1]
        assert not base_same_record.startswith("Noted:")
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": RECORDS[0]}],
                                      extra_body={"policy": POLICIES[1], "options": ["escalate", "close"]})
        assert r.model_extra["decision"]["answer"] in ("escalate", "close")
    finally:
        srv.stop()
