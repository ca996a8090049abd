"""A GGUF with a real model's exact shape and quantization but random weights, for throughput only.

Why: the GPU machine lent for benchmarks reaches no registry and takes at most 64 MiB of files, so the
demo's 1.1 GB GGUF cannot travel there. Decode and prompt speed depend on the architecture, the tensor
shapes and the quantization types, not on the weight values, so a file with the demo model's metadata
(tokenizer included) and tensor layout, filled with random numbers and quantized by llama.cpp with the
same recipe, runs at the real model's tokens/s. Its answers are noise: use it for speed, never quality.
`bench/gpu_tokens.py` checks the claim on the CPU (real vs synthetic, same run) before trusting it.

    python bench/synth_gguf.py describe REAL.gguf SHAPE.json.gz    # metadata + tensor layout, ~2 MB
    python bench/synth_gguf.py make SHAPE.json.gz OUT.gguf          # random F16, then llama.cpp quantize

Needs gguf-py (`pip install gguf`, or the copy vendored in llama-cpp-python's sdist on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np

SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


def describe(src: Path, out: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(src)
    fields = []
    for name, field in reader.fields.items():
        if name.startswith(SKIP_KEYS):
            continue
        main = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if main == GGUFValueType.ARRAY else None
        value = field.contents()
        fields.append({"key": name, "type": main.name, "sub": sub.name if sub else None, "value": value})
    tensors = [{"name": t.name, "shape": [int(n) for n in t.shape], "type": t.tensor_type.name}
               for t in reader.tensors]
    arch = reader.fields["general.architecture"].contents()
    file_type = int(reader.fields["general.file_type"].contents())
    doc = {"source": src.name, "size_bytes": src.stat().st_size, "architecture": arch,
           "file_type": file_type, "fields": fields, "tensors": tensors}
    with gzip.open(out, "wt", encoding="utf-8") as f:
        json.dump(doc, f)
    print(f"{src.name}: {arch}, {len(tensors)} tensors, file type {file_type} -> {out} "
          f"({out.stat().st_size:,} bytes)")


def make(shape: Path, out: Path, *, seed: int = 0) -> None:
    from gguf import GGUFValueType, GGUFWriter

    with gzip.open(shape, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    f16_path = out.with_suffix(".f16.gguf")
    writer = GGUFWriter(f16_path, doc["architecture"])
    for field in doc["fields"]:
        sub = GGUFValueType[field["sub"]] if field["sub"] else None
        writer.add_key_value(field["key"], field["value"], GGUFValueType[field["type"]], sub_type=sub)
    writer.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16: the input llama.cpp's quantizer expects
    plan = []
    for t in doc["tensors"]:
        # 1-D tensors (norms, biases) stay F32 as in every llama.cpp conversion; matrices go in as F16
        dtype = np.float32 if len(t["shape"]) == 1 or t["type"] == "F32" else np.float16
        numpy_shape = tuple(reversed(t["shape"]))  # GGUF lists ne0 first; numpy is row-major
        nbytes = int(np.prod(numpy_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(t["name"], numpy_shape, np.dtype(dtype), nbytes)
        plan.append((numpy_shape, dtype))
    writer.write_header_to_file(f16_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for numpy_shape, dtype in plan:
        if dtype is np.float32:
            data = np.ones(numpy_shape, dtype=np.float32)  # norm weights of 1, biases of 1: harmless
        else:
            data = (rng.standard_normal(numpy_shape, dtype=np.float32) * 0.02).astype(np.float16)
        writer.write_tensor_data(data)
    writer.close()
    _quantize(f16_path, out, doc["file_type"])
    f16_path.unlink()
    print(f"{out}: {out.stat().st_size:,} bytes (the real {doc['source']}: {doc['size_bytes']:,})")


def _quantize(src: Path, dst: Path, file_type: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama.cpp could not quantize {src} to file type {file_type} (rc {rc})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe")
    d.add_argument("src", type=Path)
    d.add_argument("out", type=Path)
    m = sub.add_parser("make")
    m.add_argument("shape", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "describe":
        describe(args.src, args.out)
    else:
        make(args.shape, args.out, seed=args.seed)


if __name__ == "__main__":
    main()
