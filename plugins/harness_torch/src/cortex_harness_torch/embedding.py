"""Embedding models: sentence-transformers style repos, and encoders, turned into vectors.

A repo is an embedding model when it carries sentence-transformers' ``modules.json`` (the
layout of every embedding model on the hub: BERT-style encoders and decoder-based ones such as
Qwen3-Embedding alike), or when its ``config.json`` names no language-model head (a plain
encoder). It loads as transformers' ``AutoModel`` (the network without a head); a vector is the
pooling its ``1_Pooling/config.json`` says (mean of the tokens by default; the CLS token; the
last token for decoder embedders), normalised to unit length when the repo has a ``Normalize``
module, as sentence-transformers itself computes it. The neuron runs a request's inputs as one
padded batch on the device's worker (``POST /v1/embeddings``), not through the generation
scheduler: an embedding is one forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.harness import EMBEDDINGS, HarnessError, PromptError
from cortex_harness_torch.model import guarded, release_device_cache, weight_bytes

if TYPE_CHECKING:
    import torch

POOLING_MODES = ("mean", "cls", "lasttoken", "max")
# What sentence-transformers' pooling config calls each mode.
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
}
# The files besides the top-level ones an embedding repo needs (sentence-transformers layout).
EMBEDDING_FILES = ("modules.json", "1_Pooling/config.json")


def is_embedding_repo(file_names: list[str], config: dict[str, Any] | None) -> bool:
    """A sentence-transformers repo, or a config whose architectures have no LM head."""
    if "modules.json" in file_names:
        return True
    architectures = (config or {}).get("architectures") or []
    if not architectures:
        return False
    return not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def pooling_of(snapshot: Path) -> tuple[str, bool]:
    """(pooling mode, normalise) from the repo's sentence-transformers files; mean and no
    normalisation for a plain encoder."""
    mode, normalize = "mean", False
    modules_file = snapshot / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text())
        except ValueError as exc:
            raise HarnessError(f"{modules_file} is not valid JSON: {exc}") from None
        normalize = any(
            isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in modules
        )
    pooling_file = snapshot / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        try:
            pooling = json.loads(pooling_file.read_text())
        except ValueError as exc:
            raise HarnessError(f"{pooling_file} is not valid JSON: {exc}") from None
        chosen = [mode for key, mode in _POOLING_KEYS.items() if pooling.get(key)]
        if len(chosen) > 1:
            raise HarnessError(f"{pooling_file}: several pooling modes at once ({chosen})")
        if chosen:
            mode = chosen[0]
    return mode, normalize


class TorchEmbeddingModel:
    """A loaded embedding model (``cortex.harness`` ``embed``); every method runs on the
    device's worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        torch_device: torch.device,
        context_length: int,
        pooling: str,
        normalize: bool,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.torch_device = torch_device
        self.context_length = context_length
        self.pooling = pooling
        self.normalize = normalize
        self.dimensions = int(getattr(model.config, "hidden_size", 0) or 0)
        self.capabilities = frozenset({EMBEDDINGS})

    # ---- the LoadedModel contract (an embedding model does not generate) --------------------

    def render_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        raise PromptError("this is an embedding model: use /v1/embeddings")

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def start(self, prompt_ids: list[int], sampling: Any) -> Any:
        raise PromptError("this is an embedding model: use /v1/embeddings")

    def reset(self) -> None:
        release_device_cache(self.torch_device)

    def memory_bytes(self) -> int:
        return 0 if self.model is None else weight_bytes(self.model)

    def unload(self) -> None:
        import gc

        self.model = None
        self.tokenizer = None
        gc.collect()
        release_device_cache(self.torch_device)

    # ---- embeddings ---------------------------------------------------------------------

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input (token ids), all inputs in one padded forward pass."""
        return guarded(lambda: self._embed(inputs))

    def _embed(self, inputs: list[list[int]]) -> list[list[float]]:
        import torch

        if self.model is None:
            raise HarnessError("the model has been unloaded")
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        for i, tokens in enumerate(inputs):
            wrong = [t for t in tokens if vocab and not 0 <= t < vocab]
            if wrong:
                raise PromptError(
                    f"input[{i}] has token id {wrong[0]}, outside the vocabulary (0-{vocab - 1})"
                )
        width = max(len(ids) for ids in inputs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):  # right-padded: positions start at 0 per row
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        device = self.torch_device
        with torch.inference_mode():
            output = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
            hidden = output.last_hidden_state.float()
            vectors = pool(hidden, mask.to(device), self.pooling)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return [row.tolist() for row in vectors.cpu()]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Token states ``[batch, tokens, dim]`` -> one vector per row, over its real tokens."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def load_embedding_model(
    snapshot: Path, torch_device: Any, dtype: Any, context_length: int, tokenizer: Any
) -> TorchEmbeddingModel:
    from transformers import AutoModel

    pooling, normalize = pooling_of(snapshot)
    model = AutoModel.from_pretrained(
        snapshot, dtype=dtype, local_files_only=True, trust_remote_code=False
    )
    model.to(torch_device)
    model.eval()
    return TorchEmbeddingModel(model, tokenizer, torch_device, context_length, pooling, normalize)
