"""The served answer cache: a request that was answered before is answered again without the model.

Two layers, looked up in order. The exact layer keys an answer by the request's `normalise`d inputs
(Unicode NFKC, case folded, whitespace collapsed, fields in name order), so "Refund  pls" and
"refund pls" share it. The optional semantic layer embeds the inputs (`LlamaEmbedder`: a GGUF in
llama.cpp's embedding mode, L2-normalised) and answers from the most similar earlier request when the
cosine similarity reaches a declared threshold, measured on a paraphrase set (docs/cache.md) so that a
near miss ("charged twice" / "not charged") never gets another ticket's answer.

Both layers are partitioned by a `Scope` (bento version, program hash, tenant): a new version, another
program variant or another tenant starts empty and can never read another scope's answers. Entries expire
after `ttl_s` and each scope keeps at most `max_entries` per layer (the oldest go first). The core is pure
Python over an injected clock and embedder, so tests use a `FakeEmbedder` and a fake clock; the service
answers on several threads and one lock guards the tables (embedding runs outside it).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from cachetools import LRUCache, TTLCache

if TYPE_CHECKING:
    from framework.spec import CacheSpec, ModelSpec, Project

Kind = Literal["exact", "semantic"]


@dataclass(frozen=True)
class Scope:
    """Who may share answers: one bento version, one program (flag variants differ), one tenant.

    `version` is the served bento's version (its content hash), `program` the content hash of the program
    that answers (framework/content.py `program_hash`), `tenant` the caller's tenant ("" without API keys).
    """

    version: str
    program: str
    tenant: str = ""


@dataclass(frozen=True)
class Hit:
    """A cached answer: a copy of what was stored, how it was found, and where it came from."""

    answer: dict[str, Any]
    kind: Kind
    similarity: float      # cosine similarity to the stored request; 1.0 for an exact hit
    age_s: float           # seconds since it was stored
    request_id: str        # the request whose model call produced it (for traces: "answered from ...")


def normalise_text(text: str) -> str:
    """NFKC, case folded, whitespace runs collapsed to one space, trimmed. Idempotent."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def normalise(inputs: Mapping[str, Any]) -> str:
    """The exact-layer key of a request's inputs: every field, in name order, its value normalised.

    Non-string values are written as sorted JSON first. The result is a JSON list of [name, text] pairs,
    so no field's text can be mistaken for a separator or another field."""
    pairs = [[name, normalise_text(_field_text(inputs[name]))] for name in sorted(inputs)]
    return json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))


def embed_text(inputs: Mapping[str, Any]) -> str:
    """What the semantic layer embeds: the field values in name order, one per line, NFKC and whitespace
    collapsed but case kept (capitals carry meaning for a language model: "US" is not "us")."""
    lines = (unicodedata.normalize("NFKC", _field_text(inputs[name])) for name in sorted(inputs))
    return "\n".join(" ".join(line.split()) for line in lines)


class Embedder(Protocol):
    """Texts → an (n, dim) float32 array of L2-normalised rows. `name` identifies the model and pooling.
    `fits(text)`: can the text be embedded whole? One that cannot is kept out of the semantic layer (two
    long tickets that differ only past the cut must never match)."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def fits(self, text: str) -> bool: ...


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


POOLINGS = ("mean", "last")


class LlamaEmbedder:
    """A GGUF in llama.cpp's embedding mode: one context, one text at a time under a lock (a llama.cpp
    context is not safe under concurrent decode). `pooling` picks how token states become one vector:
    `mean` averages them, `last` takes the final token's (a causal model has read the whole text there).
    `template` wraps each text ("{text}" leaves it as it is). A text longer than the context is cut, and
    `fits` says so beforehand (the cache then leaves it to the exact layer).

    The context returns every token's last-layer state (pooling type none) and the pooling is done here:
    llama.cpp's own mean/last pooling gives the same vectors but measured 5-10x slower per text with
    llama-cpp-python 0.3.36 on 2 CPU cores, and so is a context larger than tickets need (docs/cache.md)."""

    def __init__(self, model_path: str | Path, *, pooling: Literal["mean", "last"] = "mean",
                 template: str = "{text}", context_size: int = 512, threads: int | None = None,
                 name: str = "", verbose: bool = False):
        import llama_cpp

        from framework.errors import ModelError

        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        if not Path(model_path).exists():
            raise ModelError(f"embedding model file {model_path} is missing",
                             hint="run `slipway models pull <project> --model <key>`")
        try:
            # n_batch = n_ubatch = n_ctx: one text is decoded in one batch
            self._llama = llama_cpp.Llama(model_path=str(model_path), embedding=True,
                                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, n_ctx=context_size,
                                          n_batch=context_size, n_ubatch=context_size, n_threads=threads,
                                          verbose=verbose)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {model_path} for embeddings: {exc}",
                             hint="is it a GGUF file for this llama-cpp-python version?") from None
        self.pooling = pooling
        self.template = template
        self.context_size = context_size
        self.name = f"{name or Path(model_path).name}:{pooling}"
        self._lock = threading.Lock()

    def fits(self, text: str) -> bool:
        tokens = self._llama.tokenize(self.template.format(text=text).encode("utf-8"))
        return len(tokens) <= self.context_size

    def close(self) -> None:
        """Free the model now (llama_cpp's own __del__ fails noisily at interpreter exit)."""
        with self._lock, contextlib.suppress(Exception):
            self._llama.close()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            with self._lock:
                states = np.asarray(self._llama.embed(self.template.format(text=text or " "), truncate=True),
                                    dtype=np.float32)
            rows.append(states.mean(axis=0) if self.pooling == "mean" else states[-1])
        return unit_rows(np.stack(rows))


# Tokens an embedding context holds: tickets run to ~400 tokens; a larger context made each embedding
# slower (attention over the whole cache), and a longer text stays out of the semantic layer (`fits`).
EMBED_CONTEXT = 512
_EMBEDDERS: dict[tuple, LlamaEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


@atexit.register
def _close_embedders() -> None:
    for embedder in _EMBEDDERS.values():
        embedder.close()
    _EMBEDDERS.clear()


def load_embedder(project: Project, spec: CacheSpec | None = None) -> LlamaEmbedder:
    """The project's `[cache].embedding_model` from the local model cache (framework/weights.py), sha256-
    verified. Raises SpecError when none is named, ModelError when the file is missing or not the pinned one."""
    from framework.weights import ensure

    spec = spec or project.spec.cache
    if spec.embedding_model is None:
        from framework.errors import SpecError

        raise SpecError("[cache] names no embedding_model", path=str(project.toml_path),
                        field="cache.embedding_model", hint='name a key of [models.*], e.g. embedding_model = "qwen05"')
    model = project.model(spec.embedding_model)
    field = f"models.{spec.embedding_model}"
    path = ensure(model, project.dir, toml=str(project.toml_path), field=field)
    return open_embedder(spec, model, path, field=field)


def open_embedder(spec: CacheSpec, model: ModelSpec, path: Path, *, field: str = "models") -> LlamaEmbedder:
    """The embedder `[cache]` declares, over the GGUF at `path` (e.g. a served bento's copy), after checking
    its sha256 against `model` (ModelError otherwise); loaded once per process and settings."""
    from framework.weights import verify

    verify(model, Path(path), field=f"{field}.sha256")
    key = (str(path), spec.pooling, spec.template, min(model.context_size, EMBED_CONTEXT), model.threads)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = LlamaEmbedder(path, pooling=spec.pooling, template=spec.template,
                                            context_size=key[3], threads=model.threads, name=model.name)
        return _EMBEDDERS[key]


@dataclass
class _Entry:
    answer: dict[str, Any]
    request_id: str
    born: float


class _Index:
    """One scope's semantic entries: a ring of at most `capacity` unit vectors (the oldest overwritten),
    grown by doubling so a scope with three answers does not hold a full matrix. `born` is kept as an
    array beside the vectors so a search (and its expiry mask) is numpy alone."""

    def __init__(self, dim: int, capacity: int):
        self.capacity = capacity
        rows = min(capacity, 64)
        self.vectors = np.zeros((rows, dim), dtype=np.float32)
        self.born = np.full(rows, -np.inf)
        self.entries: list[_Entry | None] = [None] * rows
        self.count = 0      # rows in use
        self.next = 0       # once at capacity: the oldest row, which the next put overwrites

    def add(self, vector: np.ndarray, entry: _Entry) -> None:
        rows = self.vectors.shape[0]
        if self.count == rows < self.capacity:   # full but allowed more: double
            grown = min(self.capacity, rows * 2)
            self.vectors = np.vstack([self.vectors, np.zeros((grown - rows, self.vectors.shape[1]), np.float32)])
            self.born = np.concatenate([self.born, np.full(grown - rows, -np.inf)])
            self.entries.extend([None] * (grown - rows))
            rows = grown
        if self.count < rows:
            row = self.count
            self.count += 1
        else:                                       # at capacity: overwrite the oldest (rows fill in order)
            row = self.next
            self.next = (self.next + 1) % rows
        self.vectors[row] = vector
        self.born[row] = entry.born
        self.entries[row] = entry

    def best(self, query: np.ndarray, oldest_alive: float) -> tuple[float, _Entry] | None:
        """The most similar entry born at or after `oldest_alive`, with its cosine similarity."""
        if self.count == 0:
            return None
        sims = np.where(self.born[: self.count] >= oldest_alive, self.vectors[: self.count] @ query, -np.inf)
        row = int(np.argmax(sims))
        entry = self.entries[row]
        return None if entry is None or not np.isfinite(sims[row]) else (float(sims[row]), entry)

    def newest(self) -> float:
        return float(self.born[: self.count].max()) if self.count else -np.inf

    def alive(self, oldest_alive: float) -> int:
        return int((self.born[: self.count] >= oldest_alive).sum())


class AnswerCache:
    """Exact and (with an `embedder`) semantic answer cache, partitioned by `Scope`.

    `threshold`: cosine similarity in (0, 1] a semantic hit needs. `ttl_s`: seconds an answer is served.
    `max_entries`: answers each scope keeps, per layer. `clock`: seconds, monotonic (tests pass a fake).
    Counters (`stats()`) count lookups: every `get` is an exact hit or miss; each exact miss with the
    semantic layer on is then a semantic hit or miss, or skipped (a text too long to embed whole).
    """

    def __init__(self, *, exact: bool = True, embedder: Embedder | None = None, threshold: float = 0.95,
                 ttl_s: float = 3600.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold {threshold}: expected a cosine similarity in (0, 1]")
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.exact = exact
        self.embedder = embedder
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._exact: dict[Scope, TTLCache] = {}
        self._semantic: dict[Scope, _Index] = {}
        # get() embeds a missed request and put() stores the same one after the model answered: the
        # vector is kept here between the two, so a miss costs one embedding, not two
        self._vectors: LRUCache = LRUCache(maxsize=256)
        self._counts = {"exact_hits": 0, "exact_misses": 0, "semantic_hits": 0, "semantic_misses": 0,
                        "semantic_skipped": 0, "puts": 0}

    @classmethod
    def from_spec(cls, spec: CacheSpec, embedder: Embedder | None = None,
                  clock: Callable[[], float] = time.monotonic) -> AnswerCache:
        """The cache `[cache]` declares; `embedder` is required when `semantic = true`."""
        if spec.semantic and embedder is None:
            raise ValueError("[cache] semantic = true needs an embedder (load_embedder(project))")
        return cls(exact=spec.exact, embedder=embedder if spec.semantic else None, threshold=spec.threshold,
                   ttl_s=spec.ttl_s, max_entries=spec.max_entries, clock=clock)

    @property
    def semantic(self) -> bool:
        return self.embedder is not None

    def get(self, scope: Scope, inputs: Mapping[str, Any], *, semantic: bool = True) -> Hit | None:
        """The cached answer for these inputs in this scope, or None. Never an answer of another scope.
        `semantic=False` looks in the exact layer only (a loaded worker skipping the embedding)."""
        key = normalise(inputs)
        now = self._clock()
        if self.exact:
            with self._lock:
                table = self._exact.get(scope)
                found: _Entry | None = table.get(key) if table is not None else None
                self._counts["exact_hits" if found is not None else "exact_misses"] += 1
            if found is not None:
                return Hit(copy.deepcopy(found.answer), "exact", 1.0, now - found.born, found.request_id)
        if not (self.semantic and semantic):
            return None
        vector = self._vector(inputs)
        if vector is None:   # too long to embed whole: the exact layer alone answers it
            with self._lock:
                self._counts["semantic_skipped"] += 1
            return None
        with self._lock:
            index = self._semantic.get(scope)
            best = index.best(vector, now - self.ttl_s) if index is not None else None
            hit = best is not None and best[0] >= self.threshold
            self._counts["semantic_hits" if hit else "semantic_misses"] += 1
        if not hit:
            return None
        similarity, entry = best  # type: ignore[misc]
        return Hit(copy.deepcopy(entry.answer), "semantic", min(similarity, 1.0), now - entry.born, entry.request_id)

    def put(self, scope: Scope, inputs: Mapping[str, Any], answer: Mapping[str, Any], request_id: str) -> None:
        """Store the model's answer to these inputs (a deep copy) in both layers of this scope."""
        entry = _Entry(copy.deepcopy(dict(answer)), request_id, self._clock())
        vector = self._vector(inputs) if self.semantic else None
        key = normalise(inputs)
        with self._lock:
            self._counts["puts"] += 1
            self._drop_dead_scopes(entry.born)
            if self.exact:
                table = self._exact.get(scope)
                if table is None:
                    table = self._exact[scope] = TTLCache(maxsize=self.max_entries, ttl=self.ttl_s, timer=self._clock)
                table[key] = entry
            if vector is not None:
                index = self._semantic.get(scope)
                if index is None:
                    index = self._semantic[scope] = _Index(vector.shape[0], self.max_entries)
                index.add(vector, entry)

    def _vector(self, inputs: Mapping[str, Any]) -> np.ndarray | None:
        """The inputs' unit vector, or None when the embedder cannot take the text whole."""
        assert self.embedder is not None
        text = embed_text(inputs)
        with self._lock:
            vector = self._vectors.get(text)
        if vector is None:
            if not self.embedder.fits(text):
                return None
            vector = unit_rows(self.embedder.embed([text]))[0]
            with self._lock:
                self._vectors[text] = vector
        return vector

    def _drop_dead_scopes(self, now: float) -> None:
        """Forget scopes with nothing alive (an old version's): their memory, not just their entries."""
        for scope, table in list(self._exact.items()):
            table.expire()
            if not table:
                del self._exact[scope]
        for scope, index in list(self._semantic.items()):
            if index.newest() < now - self.ttl_s:
                del self._semantic[scope]

    def __len__(self) -> int:
        """Live entries in the exact layer, or in the semantic layer when exact is off (all scopes)."""
        now = self._clock()
        with self._lock:
            if self.exact:
                for table in self._exact.values():
                    table.expire()
                return sum(len(table) for table in self._exact.values())
            return sum(index.alive(now - self.ttl_s) for index in self._semantic.values())

    def stats(self) -> dict[str, int]:
        """Lookup counters since start (exact_hits, exact_misses, semantic_hits, semantic_misses,
        semantic_skipped, puts) and the scopes held, for the service's metrics."""
        with self._lock:
            return {**self._counts, "scopes": len(set(self._exact) | set(self._semantic))}

    def clear(self) -> None:
        with self._lock:
            self._exact.clear()
            self._semantic.clear()
            self._vectors.clear()


# -- measuring the cache on a paraphrase set (`slipway check`) ---------------------------------------------

@dataclass(frozen=True)
class CacheScore:
    """The whole cache (exact, then semantic) on a labelled paraphrase set: for each pair, `a` is stored and
    `b` looked up in an empty scope. A hit on a same-meaning pair is wanted; on a different-meaning pair it
    is a wrong hit, another ticket's answer served."""

    path: str
    sha256: str
    model: str          # the embedder's name ("" without the semantic layer)
    threshold: float
    n_same: int
    hits: int           # same-meaning pairs answered from the cache
    n_different: int
    wrong_hits: int     # different-meaning pairs answered from the cache
    by_kind: dict[str, int]   # hits of either label by layer: {"exact": n, "semantic": n}

    def figures(self) -> dict[str, tuple[float, tuple[float, float]]]:
        from framework.guardrails import wilson

        hit = self.hits / self.n_same if self.n_same else float("nan")
        wrong = self.wrong_hits / self.n_different if self.n_different else float("nan")
        return {"cache_hit_rate": (hit, wilson(self.hits, self.n_same)),
                "cache_wrong_hit_rate": (wrong, wilson(self.wrong_hits, self.n_different))}


def load_paraphrases(path: Path, where: str = "cache.paraphrases") -> list[dict]:
    """Rows `{"a", "b", "same": bool, "lang", "tags"}`; DatasetError naming the line when one is not."""
    from framework.dataset import jsonl_objects
    from framework.errors import DatasetError

    rows = []
    for number, row in jsonl_objects(path, where=where, what="paraphrase set", remove="paraphrases"):
        if not (isinstance(row, dict) and isinstance(row.get("a"), str) and isinstance(row.get("b"), str)
                and isinstance(row.get("same"), bool)):
            raise DatasetError(f"{path}:{number}: each row needs strings `a` and `b` and `same`: true or false",
                               path=str(path), line=number, field=where)
        rows.append(row)
    if not rows:
        raise DatasetError(f"the paraphrase set {path} has no rows", path=str(path), field=where)
    return rows


def score_paraphrases(rows: Sequence[Mapping[str, Any]], cache: AnswerCache, *, field: str = "text",
                      path: str = "", sha256: str = "") -> CacheScore:
    """Run each pair through `cache` (its own scope per pair, so pairs never see each other's answers).
    Each text is the request's one input `field` (its name changes neither key nor embedding text)."""
    hits = wrong = 0
    kinds = {"exact": 0, "semantic": 0}
    for number, row in enumerate(rows):
        scope = Scope(version="paraphrase-check", program=str(number))
        cache.put(scope, {field: row["a"]}, {"pair": number}, request_id=f"pair-{number}")
        found = cache.get(scope, {field: row["b"]})
        if found is not None:
            kinds[found.kind] += 1
            hits += bool(row["same"])
            wrong += not row["same"]
    n_same = sum(1 for row in rows if row["same"])
    name = cache.embedder.name if cache.embedder is not None else ""
    return CacheScore(path=path, sha256=sha256, model=name, threshold=cache.threshold, n_same=n_same, hits=hits,
                      n_different=len(rows) - n_same, wrong_hits=wrong, by_kind=kinds)


def measure(project: Project) -> CacheScore | None:
    """The project's `[cache]` on its `paraphrases` set with its embedder (None when no set is declared).
    The semantic layer is measured even while `semantic = false`, so a team sees the figures first."""
    from framework.content import file_hash

    spec = project.spec.cache
    if spec.paraphrases is None:
        return None
    path = project.dir / spec.paraphrases
    rows = load_paraphrases(path)
    cache = AnswerCache(exact=spec.exact, embedder=load_embedder(project, spec), threshold=spec.threshold,
                        ttl_s=spec.ttl_s, max_entries=max(spec.max_entries, 2))
    shown = str(path.relative_to(project.dir)) if path.is_relative_to(project.dir) else str(path)
    return score_paraphrases(rows, cache, path=shown, sha256=file_hash(path))

