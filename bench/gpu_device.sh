#!/usr/bin/env bash
# CPU vs GPU tokens/s on a lent CUDA machine that reaches no package registry (BENCHMARKS.md, "GPU").
#
# Everything travels in two ignored folders of the checkout: .gpu/ (llama-cpp-python's sdist trimmed to
# the CPU and CUDA backends, lcp-src.tar.gz; the demo model's shape, qwen15.shape.json.gz, from
# `bench/synth_gguf.py describe`; requests.json from `bench/gpu_tokens.py record`; optionally a real
# small GGUF) and .whl/ (pydantic and diskcache wheels for that machine's Python). The script builds a
# CUDA llama-cpp-python for the card it finds, makes the synthetic demo-shaped GGUF, and runs
# bench/gpu_tokens.py on every model, CPU rows first.
#
# Making .gpu/lcp-src.tar.gz (76 MB as published, 6.4 MB trimmed; the 64 MiB the machine takes is the limit):
#     pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps && tar xzf llama_cpp_python-0.3.36.tar.gz
#     cd llama_cpp_python-0.3.36 && rm -rf .git vendor/llama.cpp/{models,docs,media,benches,tests,tools/ui} \
#         vendor/llama.cpp/examples/*/ && for d in vendor/llama.cpp/ggml/src/ggml-*/; do
#         case $d in *ggml-cpu/|*ggml-cuda/) ;; *) rm -rf "$d";; esac; done   # keep vendor/ (CMake adds it)
#     cd .. && tar czf .gpu/lcp-src.tar.gz llama_cpp_python-0.3.36
#
# Output: $OUT/gpu_tokens.json (or $OUT/gpu_batch.json) and the log.
#
#     bash bench/gpu_device.sh [all|synthetic|real] [gpu_tokens.py run options]
#     bash bench/gpu_device.sh batch [gpu_tokens.py batch options]   # the batched engine (issue 13), synthetic model
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
SITE=/root/site; BUILD=/root/lcp-build
# The CPU rows use the same portable CPU build as the Makefile (AVX2/FMA, no AVX-512/AMX), so they are
# the CPU figures a user of `make install` gets on that processor.
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc
if ! PYTHONPATH="$SITE" python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    rm -rf "$BUILD" && mkdir -p "$BUILD" && tar xzf .gpu/lcp-src.tar.gz -C "$BUILD"
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
    start=$(date +%s)
    (cd "$BUILD"/llama_cpp_python-* && \
     CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${cap}-real -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF $CPU_FLAGS" \
     CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip wheel -q --no-build-isolation --no-deps -w "$BUILD/wheels" .)
    echo "CUDA build of llama-cpp-python for sm_${cap}: $(( $(date +%s) - start )) s"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$BUILD"/wheels/*.whl
fi
export PYTHONPATH="$SITE:$BUILD/$(ls "$BUILD" | grep llama_cpp_python | head -1)/vendor/llama.cpp/gguf-py"
# Which models: "synthetic" (the demo's shape), "real" (GGUFs in .gpu/), or both (default); "batch" runs
# `gpu_tokens.py batch` on the synthetic model instead of `run`.
WHICH="${1:-all}"; shift || true
CMD=run; OUTFILE=gpu_tokens.json
if [ "$WHICH" = batch ]; then CMD=batch; OUTFILE=gpu_batch.json; WHICH=synthetic; fi
models=()
if [ "$WHICH" != real ] && [ -f .gpu/qwen15.shape.json.gz ]; then
    [ -f /root/synthetic-qwen15.gguf ] || python3 bench/synth_gguf.py make .gpu/qwen15.shape.json.gz /root/synthetic-qwen15.gguf
    models+=(/root/synthetic-qwen15.gguf)
fi
if [ "$WHICH" != synthetic ]; then for f in .gpu/*.gguf; do [ -f "$f" ] && models+=("$f"); done; fi
requests=(); [ -f .gpu/requests.json ] && requests=(--requests .gpu/requests.json)
python3 bench/gpu_tokens.py "$CMD" "${models[@]}" "${requests[@]}" --out "$OUT/$OUTFILE" "$@"
