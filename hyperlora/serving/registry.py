"""What a request may name: the base model, registered policies (by content-hash id) and server-side adapters.

* Policies: ``POST /v1/policies`` registers a text under ``policy-<16 hex of sha256(text)>``; the same text
  always gets the same id, and a changed text gets another one, so an id never serves stale weights. The
  adapter itself is keyed in the pool by (hypernetwork weights, text, rank, scale), never by the id.
* Adapters: PEFT directories found under the ``--adapter-dir`` folders given at start, loaded by
  ``Runtime.load_peft`` under their directory names. Clients never pass paths.

`PolicyRegistry.resolve(policy, model)` turns a request's ``policy`` and ``model`` fields into one runtime
entry (a policy text, an adapter name, or None for the base model). An id or name that is not known is an
`APIError` (404) that names the closest known ids: it is never served as if it were a policy text.
"""
from __future__ import annotations

import difflib
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from hyperlora.runtime.runtime import Runtime
from hyperlora.serving.protocol import APIError

__all__ = ["PolicyRegistry", "Policy", "policy_id", "find_adapter_dirs", "POLICY_ID"]

POLICY_ID = re.compile(r"policy-[0-9a-f]{16}")
_ID_LIKE = re.compile(r"policy-\S*")


def policy_id(text: str) -> str:
    return "policy-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def find_adapter_dirs(folders: Iterable[str | Path]) -> dict[str, Path]:
    """name -> PEFT directory: each folder that holds ``adapter_config.json`` is one adapter (named after it),
    otherwise each of its subdirectories that does. Two adapters with one name are a ValueError."""
    out: dict[str, Path] = {}
    for f in folders:
        root = Path(f).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--adapter-dir {str(root)!r} is not a directory")
        found = [root] if (root / "adapter_config.json").is_file() else sorted(
            d for d in root.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file())
        if not found:
            raise FileNotFoundError(f"--adapter-dir {str(root)!r} holds no PEFT adapter (adapter_config.json)")
        for d in found:
            if d.name in out:
                raise ValueError(f"two adapters are named {d.name!r}: {out[d.name]} and {d}; rename one")
            out[d.name] = d.resolve()
    return out


@dataclass(frozen=True)
class Policy:
    id: str
    text: str
    tokens: int
    created: int

    def card(self) -> dict:
        return {"id": self.id, "object": "policy", "created": self.created, "text": self.text, "tokens": self.tokens}


class PolicyRegistry:
    """base_id: the model name clients use for the plain base model; adapters: names loaded into the runtime;
    count_tokens: policy text -> token count (for ``max_policy_tokens``)."""

    def __init__(self, base_id: str, *, adapters: Iterable[str] = (), max_policy_tokens: int = 1024,
                 count_tokens: Callable[[str], int] = lambda t: len(t.split())):
        self.base_id = base_id
        self.adapters = list(adapters)
        self.max_policy_tokens = int(max_policy_tokens)
        self._count = count_tokens
        self._policies: dict[str, Policy] = {}
        self._lock = threading.Lock()
        self.created = int(time.time())

    @classmethod
    def with_adapters(cls, rt: Runtime, base_id: str, folders: Iterable[str | Path], **kw) -> "PolicyRegistry":
        """Load every PEFT adapter under `folders` into `rt` (validated by ``read_peft``) and serve them."""
        names = []
        for name, path in find_adapter_dirs(folders).items():
            names.append(rt.load_peft(path, name=name))
        return cls(base_id, adapters=names, **kw)

    # ---- policies ---------------------------------------------------------------------------

    def check_text(self, text: str, param: str = "policy") -> int:
        """The text's token count; APIError (400) if it is empty or longer than max_policy_tokens."""
        if not isinstance(text, str) or not text.strip():
            raise APIError(400, f"{param} is empty", param=param, code="invalid_policy")
        n = self._count(text)
        if n > self.max_policy_tokens:
            raise APIError(400, f"{param} is {n} tokens long; this server reads at most {self.max_policy_tokens} "
                                f"(--max-policy-tokens)", param=param, code="policy_too_long")
        return n

    def register(self, text: str) -> tuple[Policy, bool]:
        """(the policy, True if it was new). Registering a text again returns the same id."""
        n = self.check_text(text, "text")
        pid = policy_id(text)
        with self._lock:
            old = self._policies.get(pid)
            if old is not None:
                return old, False
            p = self._policies[pid] = Policy(pid, text, n, int(time.time()))
            return p, True

    def remove(self, pid: str) -> Policy:
        with self._lock:
            p = self._policies.pop(pid, None)
        if p is None:
            raise self._unknown(pid, "policy id", "policy")
        return p

    def get(self, pid: str) -> Policy:
        with self._lock:
            p = self._policies.get(pid)
        if p is None:
            raise self._unknown(pid, "policy id", "policy")
        return p

    def policies(self) -> list[Policy]:
        with self._lock:
            return list(self._policies.values())

    # ---- resolving a request ----------------------------------------------------------------

    def model_ids(self) -> list[str]:
        with self._lock:
            return [self.base_id] + self.adapters + list(self._policies)

    def _unknown(self, name: str, what: str, param: str) -> APIError:
        close = difflib.get_close_matches(name, self.model_ids(), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else ""
        code = "model_not_found" if param == "model" else "policy_not_found"
        return APIError(404, f"{what} {name!r} does not exist{hint} (GET /v1/models lists the base model, the "
                             f"adapters and the registered policies)", param=param, code=code)

    def _named(self, name: str) -> tuple[bool, str | None]:
        """(known, runtime entry) for an id or adapter name."""
        if name in self.adapters:
            return True, name
        with self._lock:
            p = self._policies.get(name)
        if p is not None:
            return True, p.text
        return False, None

    def resolve(self, policy: str | None, model: str) -> str | None:
        """The runtime entry for a request: ``model`` names the base model, an adapter or a policy id (the way
        vLLM names LoRA models); ``policy`` is a registered id, an adapter name, or a policy text."""
        from_model: str | None = None
        if model != self.base_id:
            known, from_model = self._named(model)
            if not known:
                raise self._unknown(model, "model", "model")
        if policy is None:
            return from_model
        known, entry = self._named(policy)
        if not known:
            if _ID_LIKE.fullmatch(policy):
                raise self._unknown(policy, "policy id", "policy")
            self.check_text(policy)
            entry = policy
        if from_model is not None and entry != from_model:
            raise APIError(400, f"model {model!r} and policy name two different adapters: give one of them",
                           param="policy", code="conflicting_policy")
        return entry
