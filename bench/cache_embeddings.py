"""Which embedding model the semantic answer cache uses, chosen by measurement (issue 16, docs/cache.md).

Candidates: the GGUFs the demo already ships (`tiny` SmolLM2-135M, `qwen05` Qwen2.5-0.5B, `qwen15`
Qwen2.5-1.5B), each with mean and last-token pooling, on the ticket as it is (`raw`) and wrapped in a
one-word-summary prompt (`prompt`, PromptEOL: a causal model's last token then sums up the text);
and WordLlama (static token embeddings whose weights ship inside its PyPI wheel) when it is importable.
Each config embeds every text of the paraphrase sets (projects/ticket-triage/data/cache/) once; pair
similarity is the cosine of the two L2-normalised vectors.

The threshold is chosen on the dev set only (`paraphrases.dev.jsonl`): the smallest value, on a 0.001
grid, above every different-meaning dev pair. Reported on the bundled set (`paraphrases.jsonl`) at that
threshold: hit rate on same-meaning pairs and wrong-hit rate on different-meaning pairs (Wilson 95%
intervals), also for non-English pairs alone; the bundled set's own zero-wrong-hit threshold and the hit
rate there; ROC AUC over all pairs; ms per embedding (2 threads, a 512-token context). The chosen
config is then run again on a sample through `framework.cache.LlamaEmbedder`, the code the service
runs, to time it one text at a time as a request would and to confirm it gives the same vectors.

Writes bench/results/cache_embeddings.json. By default each model runs the prompt template only (it gave
every model its best ordering in a first round; `--models tiny,qwen05` runs both): ~10 minutes on 2 idle
cores, the 1.5B model most of it. BENCHMARKS.md and docs/cache.md give the commands behind their figures.
WordLlama is measured when importable: `pip install --no-deps --target DIR wordllama toml safetensors`,
then PYTHONPATH=DIR (its 0.4.0.post1 wheel looks for its tokenizer in `tokenizer/` but ships it in
`tokenizers/`: link one to the other, or it tries to download the file).

    .venv/bin/python bench/cache_embeddings.py [--models tiny:prompt,qwen05:prompt] [--verify qwen05:last:prompt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from framework.cache import embed_text, unit_rows  # noqa: E402
from framework.guardrails import wilson  # noqa: E402

DATA = REPO / "projects" / "ticket-triage" / "data" / "cache"
TEMPLATES = {"raw": "{text}", "prompt": 'This support ticket: "{text}" means in one word: "'}


def pairs(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def token_states(model_path: Path, texts: list[str], template: str) -> tuple[dict[str, np.ndarray], float]:
    """Per text, the last layer's state of every token (llama.cpp, pooling none); and ms per text."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(model_path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, n_threads=2, verbose=False)
    llama.embed(template.format(text="warm-up"))
    out, start = {}, time.perf_counter()
    for text in texts:
        out[text] = np.asarray(llama.embed(template.format(text=text)), dtype=np.float32)
    ms = (time.perf_counter() - start) * 1000 / len(texts)
    del llama
    return out, ms


def similarities(vectors: dict[str, np.ndarray], rows: list[dict]) -> np.ndarray:
    return np.array([float(vectors[embed_text({"ticket": r["a"]})] @ vectors[embed_text({"ticket": r["b"]})])
                     for r in rows])


def auc(same: np.ndarray, different: np.ndarray) -> float:
    """P(a same-meaning pair scores above a different-meaning one), ties half."""
    wins = (same[:, None] > different[None, :]).sum() + 0.5 * (same[:, None] == different[None, :]).sum()
    return float(wins / (len(same) * len(different)))


def rate(hits: int, n: int) -> dict:
    lo, hi = wilson(hits, n)
    return {"rate": hits / n if n else math.nan, "hits": hits, "n": n, "interval": [lo, hi]}


def zero_wrong_threshold(different: np.ndarray) -> float:
    """The smallest threshold on a 0.001 grid that no different-meaning pair reaches."""
    return min(1.0, math.floor(float(different.max()) * 1000 + 1) / 1000)


def score(dev: list[dict], bundled: list[dict], dev_sims: np.ndarray, sims: np.ndarray) -> dict:
    dev_same = np.array([r["same"] for r in dev])
    same = np.array([r["same"] for r in bundled])
    foreign = np.array([r["lang"] != "en" for r in bundled])
    threshold = zero_wrong_threshold(dev_sims[~dev_same])
    own = zero_wrong_threshold(sims[~same])
    hit = sims >= threshold
    return {
        "threshold_from_dev": threshold,
        "hit_rate": rate(int((hit & same).sum()), int(same.sum())),
        "wrong_hit_rate": rate(int((hit & ~same).sum()), int((~same).sum())),
        "hit_rate_non_english": rate(int((hit & same & foreign).sum()), int((same & foreign).sum())),
        "wrong_hit_rate_non_english": rate(int((hit & ~same & foreign).sum()), int((~same & foreign).sum())),
        "bundled_zero_wrong_threshold": own,
        "hit_rate_at_bundled_zero_wrong": rate(int(((sims >= own) & same).sum()), int(same.sum())),
        "auc": auc(np.concatenate([dev_sims[dev_same], sims[same]]), np.concatenate([dev_sims[~dev_same],
                                                                                    sims[~same]])),
        "similarity": {"same_median": float(np.median(sims[same])), "different_median": float(np.median(sims[~same])),
                       "different_max": float(sims[~same].max())},
    }


def wordllama_vectors(texts: list[str]) -> tuple[dict[str, np.ndarray], float] | None:
    try:
        from wordllama import WordLlama
    except ImportError:
        return None
    model = WordLlama.load()
    start = time.perf_counter()
    found = {text: unit_rows(model.embed([text]))[0] for text in texts}
    return found, (time.perf_counter() - start) * 1000 / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny:prompt,qwen05:prompt,qwen15:prompt",
                        help="model keys; KEY:TEMPLATE measures that template alone (qwen15 takes ~1 s a text)")
    parser.add_argument("--verify", default="best", help="model:pooling:template to rerun through LlamaEmbedder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cache_embeddings.json")
    args = parser.parse_args()

    from framework import load_project
    from framework.weights import ensure

    project = load_project("ticket-triage", root=REPO)
    dev, bundled = pairs("paraphrases.dev.jsonl"), pairs("paraphrases.jsonl")
    texts = sorted({embed_text({"ticket": r[side]}) for r in dev + bundled for side in ("a", "b")})
    print(f"{len(dev)} dev pairs, {len(bundled)} bundled pairs, {len(texts)} distinct texts", flush=True)
    configs: list[dict] = []
    for item in [k for k in args.models.split(",") if k]:
        key, _, only = item.partition(":")   # `qwen15:prompt`: that template alone
        model = project.model(key)
        path = ensure(model, project.dir, toml=str(project.toml_path), field=f"models.{key}")
        for template_name, template in TEMPLATES.items():
            if only and template_name != only:
                continue
            states, ms = token_states(path, texts, template)
            for pooling, pool in (("mean", lambda s: s.mean(axis=0)), ("last", lambda s: s[-1])):
                vectors = {t: unit_rows(pool(s))[0] for t, s in states.items()}
                found = score(dev, bundled, similarities(vectors, dev), similarities(vectors, bundled))
                configs.append({"model": key, "model_name": model.name, "pooling": pooling,
                                "template": template_name, "ms_per_embedding": ms, **found, "_vectors": vectors})
                print(f"{key:7s} {pooling:4s} {template_name:6s} t={found['threshold_from_dev']:.3f} "
                      f"hit={found['hit_rate']['rate']:.3f} wrong={found['wrong_hit_rate']['rate']:.3f} "
                      f"auc={found['auc']:.3f} {ms:.0f} ms", flush=True)
    static = wordllama_vectors(texts)
    if static is not None:
        vectors, ms = static
        found = score(dev, bundled, similarities(vectors, dev), similarities(vectors, bundled))
        configs.append({"model": "wordllama", "model_name": "WordLlama l2_supercat 256-d (PyPI wheel weights)",
                        "pooling": "mean", "template": "raw", "ms_per_embedding": ms, **found})
        print(f"wordllama t={found['threshold_from_dev']:.3f} hit={found['hit_rate']['rate']:.3f} "
              f"wrong={found['wrong_hit_rate']['rate']:.3f} auc={found['auc']:.3f} {ms:.2f} ms", flush=True)

    # The pick: no wrong hit on the bundled set at the dev threshold, then the highest hit rate, then AUC.
    gguf = [c for c in configs if c["model"] != "wordllama"]
    best = max(gguf, key=lambda c: (c["wrong_hit_rate"]["hits"] == 0, c["hit_rate"]["rate"], c["auc"]))
    verify = best if args.verify == "best" else next(
        c for c in gguf if f"{c['model']}:{c['pooling']}:{c['template']}" == args.verify)
    verified = verify_native(project, verify, dev + bundled, texts)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpus": os.cpu_count(), "threads": 2, "llama_cpp_python": _version("llama_cpp_python"),
        "dev_pairs": len(dev), "bundled_pairs": len(bundled), "texts": len(texts),
        "templates": TEMPLATES, "configs": [{k: v for k, v in c.items() if k != "_vectors"} for c in configs],
        "best": {k: best[k] for k in ("model", "pooling", "template")}, "verified": verified,
        "command": "python bench/cache_embeddings.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"best: {result['best']}; verified through LlamaEmbedder: {verified}\nwrote {args.out}")


def verify_native(project, config: dict, rows: list[dict], texts: list[str], sample: int = 40) -> dict:
    """The config through LlamaEmbedder, one text at a time as the service embeds a request: ms per
    embedding on `sample` texts, and the largest difference from the vectors measured above."""
    from framework.cache import LlamaEmbedder
    from framework.weights import ensure

    model = project.model(config["model"])
    path = ensure(model, project.dir, toml=str(project.toml_path), field=f"models.{config['model']}")
    embedder = LlamaEmbedder(path, pooling=config["pooling"], template=TEMPLATES[config["template"]],
                             context_size=512, threads=2, name=model.name)
    embedder.embed(["warm-up"])
    chosen = texts[:: max(1, len(texts) // sample)][:sample]
    start = time.perf_counter()
    vectors = {t: embedder.embed([t])[0] for t in chosen}
    ms = (time.perf_counter() - start) * 1000 / len(chosen)
    gap = max(float(np.abs(vectors[t] - config["_vectors"][t]).max()) for t in chosen)
    embedder.close()
    return {"config": f"{config['model']}:{config['pooling']}:{config['template']}", "texts": len(chosen),
            "ms_per_embedding": ms, "max_abs_difference": gap}


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
