"""The policy reader: a hypernetwork whose adapters are built from the base model's own reading of the policy.

The T2L-style map (pooled sentence embedding -> MLP -> LoRA factors) memorizes its training policies and does
not transfer (docs/EXPERIMENTS.md, runs E1-X2). The reader replaces the learned lookup with a structure:

* The base model reads the policy as if it were a user message (same chat template as a record). Its inputs
  to the adapted layer's ``o_proj`` and ``down_proj`` at the policy's positions live in the same space as a
  record's inputs at the answer position, where (measured) the record's topic is linearly decodable: a record
  about refunds and a policy about refunds look alike there, also for topics never trained on.
* One rank-1 slot per policy token j. Its A row is a key: a mix (learned attention over the policy's tokens,
  the token itself, the last position) of those features, standardized with the records' statistics and
  mapped by a learned matrix initialised to the identity; ``A_j . x`` is then how much the record x looks like
  what the policy says around token j, centred so that an average record gives 0.
* Its B column copies the token's own output embedding (tied embeddings: writing ``E[tok]`` into the last
  residual raises that token's logit), times a signed gate ``g_j`` in (-1, 1): +1 for an answer word the policy
  gives when its condition holds, -1 for the default answer, 0 for every other token. Answer words never seen
  in training are handled by the copy, not memorized.

So ``delta logit(word) ~ sum_j g_j [tok_j == word] * similarity(record, condition_j)``. The gate is trained with
an auxiliary target where the training rule is known (topic and routing policies), and everything end to end
through the frozen base model with the option loss, then fine-tuned on the answer's later tokens and on more
policies (docs/READER.md: three stages), plus two rule heads for format rules and thresholds (stage 4). `PolicyReader` gives rank = number of policy tokens (<= limits.MAX_POLICY_TOKENS); `ReaderHypernet` serves each
policy's 16 largest-|gate| tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

from hyperlora.adapters.adapter_set import AdapterSet
from hyperlora.hypernets.limits import MAX_POLICY_TOKENS, check_policy_tokens, token_count
from hyperlora.hypernets.reader.clause_keys import with_clause_keys
from hyperlora.hypernets.reader.rules.reply_format import (PrefixCompiler, ReplyPrefixHead, load_background_records,
                                                           split_template)
from hyperlora.hypernets.reader.rules.threshold import ThresholdHead, compile_threshold
from hyperlora.hypernets.reader.text import token_spans
from hyperlora.modeling.capture import InputCapture
from hyperlora.modeling.padding import pad_ids
from hyperlora.modeling.prompts import prompt_text
from hyperlora.modeling.targets import module_name  # re-exported: its home before modeling/targets.py
from hyperlora.ops.precision import use_bf16

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "reader.safetensors"
KIND = "reader"
# added after the first shipped reader; absent means their initial value (0: the same adapters as before)
OPTIONAL_WEIGHTS = ("prev_w", "bias_v.")  # names, or prefixes ending in "."


@dataclass
class ReaderConfig:
    """Shape of a policy reader. Saved as ``config.json`` (with ``"kind": "reader"``) beside its weights."""

    layer: int                      # adapted decoder layer (its o_proj and down_proj)
    hidden_size: int
    features: dict[str, int] = field(default_factory=dict)  # module type -> its in_features
    gate_layer: int = 20            # hidden states read by the gate and the attention
    d_attn: int = 64
    max_tokens: int = 96            # the training window of older readers; reading is bounded by limits.MAX_POLICY_TOKENS
    init_scale: float = 50.0
    serve_scale: float = 1.0        # B is multiplied by this when served (calibrated after training; see READER.md)
    clause_keys: bool = False       # serve routed answer words with keys read from their own clause (clause_keys.py)
    kind: str = KIND

    @property
    def rank(self) -> int:
        return self.max_tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rank": self.rank}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ReaderConfig":
        if d.get("kind") != KIND:
            raise ValueError(f"not a policy reader config (kind={d.get('kind')!r}, expected {KIND!r})")
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


class PolicyFeatures:
    """The base model's reading of policy texts: per text, its token ids and, at each of its positions, the
    hidden state after `gate_layer` layers and the inputs of the adapted modules. Cached by text.

    A policy is read whole up to ``max_policy_tokens`` (default ``limits.MAX_POLICY_TOKENS``, 1,024) and refused
    above it with ``PolicyTooLongError``: never cut."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: ReaderConfig, bf16: bool | None = None,
                 max_policy_tokens: int = MAX_POLICY_TOKENS):
        """``bf16``: read under bfloat16 autocast on a CPU; None (default) = where the CPU runs bf16 natively."""
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.max_policy_tokens = int(max_policy_tokens)
        dev = next(model.parameters()).device
        self.bf16 = dev.type == "cpu" and use_bf16(bf16, dev)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        a = tokenizer(prompt_text(tokenizer, "alpha beta"), add_special_tokens=False)["input_ids"]
        b = tokenizer(prompt_text(tokenizer, "zzz qqq"), add_special_tokens=False)["input_ids"]
        self.prefix = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # the shared template head
        self.names = {t: module_name(model, cfg.layer, t) for t in cfg.features}

    def prompt_ids(self, text: str) -> list[int]:
        if not text or not text.strip():
            raise ValueError("policy text is empty")
        check_policy_tokens(text, token_count(self.tokenizer, text), self.max_policy_tokens)
        return self.tokenizer(prompt_text(self.tokenizer, text), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False
                 ) -> list[dict[str, torch.Tensor]]:
        """Per text (uncached ones read in batches; ``progress`` shows a bar over them)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="reading policies", unit="text", disable=not progress,
                       mininterval=5, file=sys.stderr)
            capture = InputCapture(self.model, self.names)
            store = capture.inputs
            dev = next(self.model.parameters()).device
            try:
                for s in range(0, len(todo), batch_size):
                    chunk = todo[s:s + batch_size]
                    seqs = [self.prompt_ids(t) for t in chunk]
                    # right padding: causal attention keeps real positions exact
                    ids, _ = pad_ids(seqs, self.tokenizer.pad_token_id or 0)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
                        out = self.model.model(ids.to(dev), output_hidden_states=True)
                    for j, (t, q) in enumerate(zip(chunk, seqs)):
                        n = len(q)
                        f = {"ids": torch.tensor(q[self.prefix:n]),
                             "h": out.hidden_states[self.cfg.gate_layer][j, self.prefix:n].float().cpu()}
                        for mt in self.names:
                            f[mt] = store[mt][j, self.prefix:n].float().cpu()
                        self._cache[t] = f
                    bar.update(len(chunk))
            finally:
                bar.close()
                capture.remove()
        return [self._cache[t] for t in texts]


class PolicyReader(nn.Module):
    """Policy features -> per-module LoRA factors {name: (A [P, T, d_in], B [P, d_out, T])} (scale 1).

    Buffers ``mu_<t>``, ``sd_<t>``, ``c_<t>`` hold the records' statistics at the adapted modules' inputs: mean,
    std, and a direction with ``c . x ~ 1`` for every record (LoRA has no bias; this gives it a constant)."""

    def __init__(self, cfg: ReaderConfig, embedding: torch.Tensor, names: dict[str, str]):
        super().__init__()
        self.cfg, self.names = cfg, dict(names)
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, cfg.d_attn)
        self.k = nn.Linear(d, cfg.d_attn)
        self.v = nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, 1)
        nn.init.zeros_(self.gate.weight)  # g = 0 at start: the adapter starts as an exact no-op
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("emb", embedding.detach().float().clone(), persistent=False)
        self.self_w = nn.Parameter(torch.tensor(0.0))
        self.last_w = nn.Parameter(torch.tensor(1.0))
        self.prev_w = nn.Parameter(torch.tensor(0.0))  # the previous token's features: "emit j after what preceded j"
        self.U = nn.ParameterDict({t: nn.Parameter(torch.eye(n)) for t, n in cfg.features.items()})
        self.bias = nn.ParameterDict({t: nn.Parameter(torch.zeros(1)) for t in cfg.features})
        # a slot's own constant, read from what the policy says around it: a format rule ("start every reply
        # with 'Noted:'") must fire for every record, and key . z averages 0 over records by construction
        self.bias_v = nn.ParameterDict({t: nn.Parameter(torch.zeros(n)) for t, n in cfg.features.items()})
        self.log_scale = nn.ParameterDict({t: nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
                                           for t in cfg.features})
        self.out_dir = nn.ParameterDict({t: nn.Parameter(torch.ones(d)) for t in cfg.features})
        for t, n in cfg.features.items():
            self.register_buffer(f"mu_{t}", torch.zeros(n))
            self.register_buffer(f"sd_{t}", torch.ones(n))
            self.register_buffer(f"c_{t}", torch.zeros(n))

    def set_record_stats(self, feats: dict[str, torch.Tensor]) -> None:
        """feats: module type -> [N, d_in] inputs at the answer position of N records (no adapter)."""
        for t, x in feats.items():
            x = x.float()
            sd = x.std(0)
            getattr(self, f"mu_{t}").copy_(x.mean(0))
            getattr(self, f"sd_{t}").copy_(sd + 1e-2 * sd.mean())
            ridge = 1e-3 * x.pow(2).sum() / len(x)
            c = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ torch.ones(len(x)))
            getattr(self, f"c_{t}").copy_(c)

    def forward(self, feats: Sequence[dict[str, torch.Tensor]]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Returns (adapters, gates [P, T]); row/column j >= len(policy p) is zero."""
        P, T = len(feats), max(int(f["ids"].numel()) for f in feats)
        dev = self.emb.device
        mask = torch.zeros(P, T, dtype=torch.bool, device=dev)
        H = torch.zeros(P, T, self.cfg.hidden_size, device=dev)
        ids = torch.zeros(P, T, dtype=torch.long, device=dev)
        X = {t: torch.zeros(P, T, n, device=dev) for t, n in self.cfg.features.items()}
        last = torch.zeros(P, dtype=torch.long, device=dev)
        for p, f in enumerate(feats):
            n = int(f["ids"].numel())
            mask[p, :n] = True
            last[p] = n - 1
            H[p, :n] = f["h"].to(dev)
            ids[p, :n] = f["ids"].to(dev)
            for t in X:
                X[t][p, :n] = (f[t].to(dev) - getattr(self, f"mu_{t}")) / getattr(self, f"sd_{t}")
        h = self.norm(H)
        att = (self.q(h) @ self.k(h).transpose(1, 2)) / math.sqrt(self.cfg.d_attn)
        att = att.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        g = torch.tanh(self.gate(torch.cat([h, att @ self.v(h)], -1))).squeeze(-1) * mask  # [P, T]
        E = self.emb[ids]  # [P, T, d]
        out = {}
        rows = torch.arange(P, device=dev)
        for t, name in self.names.items():
            mu, sd, c = (getattr(self, f"{k}_{t}") for k in ("mu", "sd", "c"))
            prev = nn.functional.pad(X[t][:, :-1], (0, 0, 1, 0))  # X[t][:, j - 1], zero for j = 0
            ctx = (att @ X[t] + self.self_w * X[t] + self.last_w * X[t][rows, last][:, None, :]
                   + self.prev_w * prev)
            unit = nn.functional.normalize(ctx, dim=-1)
            key = unit @ self.U[t].T / math.sqrt(ctx.shape[-1])
            const = self.bias[t] + unit @ self.bias_v[t]  # [P, T]
            w = key / sd  # A_j . x = key_j . (x - mu) / sd + const_j, with c . x ~ 1 standing in for 1
            a = (w - (w @ mu)[..., None] * c + const[..., None] * c) * mask[..., None]
            b = (g[..., None] * torch.exp(self.log_scale[t]) * self.out_dir[t] * E).transpose(1, 2)
            out[name] = (a, b)
        return out, g

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
        """config.json + reader.safetensors. dtype=torch.bfloat16 halves the file: the key maps are stored as
        their difference from the identity (bf16 cannot hold 1 + a small change), the records' statistics
        stay float32 (the constant direction c needs the precision)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {**self.cfg.to_json(), "names": self.names, **(extra or {})}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            if k.startswith("U."):
                k, v = "U_minus_eye." + k[2:], v - torch.eye(v.shape[0])
            keep32 = k.split("_", 1)[0] in ("mu", "sd", "c")
            state[k] = (v if keep32 else v.to(dtype)).contiguous()
        save_file(state, str(d / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: nn.Module) -> "PolicyReader":
        from safetensors.torch import load_file

        d = Path(directory)
        raw = json.loads((d / CONFIG_FILE).read_text())
        cfg = ReaderConfig.from_json(raw)
        names = {t: module_name(model, cfg.layer, t) for t in cfg.features}
        if raw.get("names") and raw["names"] != names:
            raise ValueError(f"this reader was trained for modules {raw['names']}, the model has {names}")
        r = cls(cfg, model.get_input_embeddings().weight, names)
        state = {}
        for k, v in load_file(str(d / WEIGHTS_FILE)).items():
            if k.startswith("U_minus_eye."):
                k, v = "U." + k[len("U_minus_eye."):], v.float() + torch.eye(v.shape[0])
            state[k] = v.float()
        missing, unexpected = r.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not any(k == o or (o.endswith(".") and k.startswith(o))
                                                        for o in OPTIONAL_WEIGHTS)]:
            raise ValueError(f"{d / WEIGHTS_FILE} does not match this reader: missing {missing}, unexpected {unexpected}")
        return r


def is_reader_dir(directory: str | Path) -> bool:
    p = Path(directory) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("kind") == KIND
    except (ValueError, OSError):
        return False


class ReaderSource:
    """Policy texts -> ``scoring.AdapterSet`` through a trained PolicyReader (the eval/demo adapter source)."""

    def __init__(self, reader: PolicyReader, features: PolicyFeatures, prefix_head: Any = None,
                 threshold_head: Any = None, background_records: Sequence[str] | None = None):
        self.reader = reader.eval()
        self.features = features
        # what hyperlora.attach serves (demo, checkpoints.load)
        self.hypernet = ReaderHypernet(reader, features, prefix_head=prefix_head, threshold_head=threshold_head,
                                       background_records=background_records)
        self.encode = None  # the reader reads policy texts itself: no separate encoder

    @classmethod
    def from_dir(cls, directory: str | Path, model: nn.Module, tokenizer: Any) -> "ReaderSource":
        r = PolicyReader.from_pretrained(directory, model)
        prefix_head = ReplyPrefixHead.load(directory)
        return cls(r, PolicyFeatures(model, tokenizer, r.cfg), prefix_head, ThresholdHead.load(directory),
                   _background_of(directory, prefix_head))

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]):
        """The adapters exactly as served (pruned to the ReaderHypernet's max_rank), zero-padded to one rank."""
        per = self.hypernet.adapters_for_texts(list(texts))
        R = max(int(a.shape[0]) for mods in per for a, _ in mods.values())
        out = {}
        for n in per[0]:
            A = torch.zeros(len(per), R, per[0][n][0].shape[1])
            B = torch.zeros(len(per), per[0][n][1].shape[0], R)
            for p, mods in enumerate(per):
                a, b = mods[n]
                A[p, : a.shape[0]] = a
                B[p, :, : b.shape[1]] = b
            out[n] = (A, B)
        return AdapterSet(out, 1.0)


class ReaderHypernet:
    """A trained PolicyReader in the shape ``hyperlora.attach`` serves: policy texts in, one adapter per policy
    written into the pool (``reads_text``: no separate policy encoder, no latent path).

    Each policy's adapter keeps only its ``max_rank`` tokens with the largest |gate| (and none below
    ``min_gate``): a token with a zero gate has a zero B column, so dropping it changes nothing, and the
    trained gates are near zero except on answer words, which makes served adapters rank ~2-8 instead of the
    policy's token count.

    A ``prefix_head`` (reply-format rules) needs ``background_records``, the reply-prefix compiler's records
    shipped beside it (``reply_format.load_background_records``; ``from_dir`` reads them)."""

    reads_text = True  # kept for callers of the old probe; the runtime reads the AdapterSource members below
    needs_encoder = False  # AdapterSource: reads the policy texts itself
    supports_latent = False  # AdapterSource: no latent head (reader rows take the materialized path)

    def __init__(self, reader: PolicyReader, features: PolicyFeatures, max_rank: int = 16, min_gate: float = 0.02,
                 prefix_head: Any = None, threshold_head: Any = None,
                 background_records: Sequence[str] | None = None):
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.reader, self.features = reader.eval(), features
        self.prefix_head, self.compiler, self.threshold_head = prefix_head, None, threshold_head
        if threshold_head is not None and "down_proj" not in reader.names:
            raise ValueError("the threshold head writes down_proj, which this reader does not adapt")
        if prefix_head is not None:
            if background_records is None:
                raise ValueError("the reply-prefix head needs the compiler's background records (reader directories "
                                 "ship them as reply_background.json; hyperlora.training.reply_background writes it)")
            self.compiler = PrefixCompiler(features.model, features.tokenizer, max_tokens=max_rank,
                                           records=background_records)
            if self.compiler.name not in reader.names.values():
                raise ValueError(f"the reply-prefix head writes {self.compiler.name}, which this reader does not "
                                 f"adapt ({sorted(reader.names.values())})")
        self.min_gate = float(min_gate)
        self.config = SimpleNamespace(rank=int(max_rank), scale=1.0)
        self.types = list(reader.names)
        self._targets = {n: (int(reader.cfg.features[t]), int(reader.cfg.hidden_size)) for t, n in reader.names.items()}
        self._id: str | None = None

    @classmethod
    def from_dir(cls, directory: str | Path, model: nn.Module, tokenizer: Any, **kw: Any) -> "ReaderHypernet":
        r = PolicyReader.from_pretrained(directory, model)
        kw.setdefault("prefix_head", ReplyPrefixHead.load(directory))
        kw.setdefault("threshold_head", ThresholdHead.load(directory))
        if kw["prefix_head"] is not None:
            kw.setdefault("background_records", _background_of(directory, kw["prefix_head"]))
        return cls(r, PolicyFeatures(model, tokenizer, r.cfg), **kw)

    def module_names(self, mtype: str) -> list[str]:
        return [self.reader.names[mtype]]

    def targets(self) -> dict[str, tuple[int, int]]:
        return dict(self._targets)

    def check_policy(self, text: str) -> None:
        """`AdapterSource.check_policy`: ``PolicyTooLongError`` for a text over the reader's token limit."""
        check_policy_tokens(text, token_count(self.features.tokenizer, text), self.features.max_policy_tokens)

    def weights_id(self) -> str:
        """Hash of the reader's weights and pruning settings (its identity in pool content keys)."""
        if self._id is None:
            tag = "|clause_keys" if self.reader.cfg.clause_keys else ""
            h = hashlib.sha256(f"reader|{self.config.rank}|{self.min_gate}{tag}".encode())
            state = dict(self.reader.state_dict())
            if self.prefix_head is not None:
                h.update(f"prefix|{self.compiler.settings()}|{self.prefix_head.templates}".encode())
                state.update({f"prefix_head.{k}": v for k, v in self.prefix_head.state_dict().items()})
            if self.threshold_head is not None:
                state.update({f"threshold_head.{k}": v for k, v in self.threshold_head.state_dict().items()})
            for k, v in sorted(state.items()):
                h.update(k.encode())
                h.update(v.detach().cpu().float().numpy().tobytes())
            self._id = h.hexdigest()[:16]
        return self._id

    def adapters_for(self, texts: Sequence[str], task_emb: torch.Tensor | None = None
                     ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """`AdapterSource.adapters_for` (hyperlora.hypernets.source): `adapters_for_texts`; task_emb is unused."""
        return self.adapters_for_texts(texts)

    @torch.no_grad()
    def adapters_for_texts(self, texts: Sequence[str]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per policy: {module name: (A [r, d_in], B [d_out, r])}, r <= config.rank, scale 1 (folded in).

        With rule heads, a policy read as a reply-format rule gets the compiled prefix or sign-off adapter
        instead (``hyperlora/hypernets/reader/rules/reply_format.py``), one read as a threshold rule the compiled threshold slot
        (``hyperlora/hypernets/reader/rules/threshold.py``); both on ``down_proj``, with a zero rank-1 adapter on the other modules."""
        feats = self.features(list(texts))
        adapters, gates = self.reader(feats)
        if self.reader.cfg.clause_keys:
            adapters = with_clause_keys(self.reader, self.features, list(texts), adapters, gates)
        out = []
        for p in range(len(texts)):
            g = gates[p].abs()
            keep = torch.argsort(g, descending=True)[: self.config.rank]
            keep = keep[g[keep] >= self.min_gate]
            if keep.numel() == 0:
                keep = torch.argsort(g, descending=True)[:1]
            keep = keep.sort().values
            k = float(self.reader.cfg.serve_scale)
            out.append({n: (a[p, keep].float().contiguous(), (k * b[p][:, keep]).float().contiguous())
                        for n, (a, b) in adapters.items()})
        for p, rule in enumerate(self.rules(texts, feats)):
            if rule is None:
                continue
            if rule[0] == "prefix":
                A, B = self.compiler(rule[1])
            elif rule[0] == "signoff":
                A, B = self.compiler.signoff(rule[1])
            else:
                model = self.features.model
                A, B = compile_threshold(self.threshold_head, self.reader.c_down_proj, self.reader.emb,
                                         model.model.norm.weight.detach().cpu(), self.features.tokenizer, *rule[1])
            down = self.reader.names["down_proj"]
            out[p] = {n: (A, B) if n == down else (torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1))
                      for n, (a, b) in out[p].items()}
        return out

    def rules(self, texts: Sequence[str], feats: Sequence[dict[str, torch.Tensor]] | None = None
              ) -> list[tuple[str, Any] | None]:
        """Per policy: ("prefix", "Noted:"), ("signoff", " -- Desk"), ("threshold", (500.0, "review", "approve"))
        or None (the reader's own adapter). A format reading wins over a threshold one."""
        feats = feats if feats is not None else self.features(list(texts))
        formats = self.reply_formats(texts, feats)
        out: list[tuple[str, Any] | None] = []
        for t, f, fmt in zip(texts, feats, formats):
            if fmt is not None:
                out.append(split_template(fmt))
                continue
            thr = None
            if self.threshold_head is not None:
                thr = self.threshold_head.predict(t, f["h"], token_spans(self.features.tokenizer, f["ids"].tolist()))
            out.append(("threshold", thr) if thr is not None else None)
        return out

    def reply_formats(self, texts: Sequence[str], feats: Sequence[dict[str, torch.Tensor]] | None = None
                      ) -> list[str | None]:
        """Per policy: the filled reply-format template its rule demands ("Noted:", or "{reply} -- Desk" for a
        sign-off), or None (no head, or not such a rule)."""
        if self.prefix_head is None:
            return [None] * len(texts)
        feats = feats if feats is not None else self.features(list(texts))
        return [self.prefix_head.predict(t, f["h"], token_spans(self.features.tokenizer, f["ids"].tolist()))
                for t, f in zip(texts, feats)]


def _background_of(directory: str | Path, prefix_head: Any) -> list[str] | None:
    """The reply-prefix compiler's background records shipped in a reader directory (None without a prefix head).
    A directory with a prefix head but no records file is an error that names the fix."""
    if prefix_head is None:
        return None
    records = load_background_records(directory)
    if records is None:
        raise FileNotFoundError(f"{Path(directory)} has a reply-prefix head but no reply_background.json (the "
                                f"compiler's background records): write it with "
                                f"hyperlora.training.reply_background.write_background_records({str(directory)!r})")
    return records
