"""Where a Hugging Face task's model comes from, and what the two HF tasks share.

``task.model_id`` is a local directory in ``save_pretrained`` layout (config.json, weights, tokenizer
files) or a hub id fetched with ``huggingface_hub``. A hub id must never hang a run: offline
(``HF_HUB_OFFLINE``) or with the hub unreachable (a 3 s connection probe), only a cached snapshot is used,
else one ConfigError names the fix. The model is wrapped in :class:`HFModel`, whose forward returns the
logits tensor alone, so the shared loop, ONNX export and the parity gate treat it like any task's model.
LoRA (peft) is applied only for the duration of :meth:`HFTask.training` (every trainer, DDP ranks included)
and merged back after it, so a checkpoint and an export always hold plain base-model weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from functools import cached_property
from pathlib import Path
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from autoglm._lazy import require
from autoglm.errors import ConfigError, DataError
from autoglm.tasks.base import Knob, Task

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # any one makes a fast tokenizer
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]

LORA_SPACE = {  # rank 0 is full fine-tuning; LoRA trains rank-r updates of the attention/MLP matrices
    "lora_rank": Knob("int", 0, low=0, high=16, step=4),
    "lora_alpha": Knob("int", 16, low=4, high=64, log=True, minimum=1),
    "lora_dropout": Knob("float", 0.05, low=0.0, high=0.2, maximum=1.0),
}
FINETUNE_SPACE = {  # pretrained weights want small steps: 5e-5 is the usual full fine-tuning rate
    "lr": Knob("float", 5e-5, low=1e-5, high=1e-3, log=True),
    "weight_decay": Knob("float", 0.0, low=0.0, high=0.1),
    "warmup_frac": Knob("float", 0.05, low=0.0, high=0.2),
    "batch_size": Knob("categorical", 8, choices=(4, 8, 16)),
    "grad_accum": Knob("categorical", 1, choices=(1, 2, 4)),
    "max_steps": Knob("int", 300, low=50, high=1000),
}


def decoder_family(model_type: str) -> str | None:
    """The decode-graph family ("gpt2", "llama") of a model_type, None where there are no decode graphs."""
    try:
        from autoglm.tasks.hf_decoder import FAMILIES
    except ImportError:
        return None
    return FAMILIES.get(model_type)


def _hub_reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def resolve_model_dir(model_id: str | None, task_name: str) -> Path:
    """The local directory of ``model_id``: the directory itself, or the hub snapshot (downloaded or cached)."""
    if not model_id:
        raise ConfigError(f"task '{task_name}' needs task.model_id: a local directory in save_pretrained layout "
                          "or a hub id such as 'HuggingFaceTB/SmolLM-135M'")
    path = Path(model_id).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        raise DataError(f"task.model_id={model_id} is no directory and no hub id (owner/name): fix the path")
    hub = require("huggingface_hub", "hf", "fetching task.model_id from the Hugging Face hub")
    fix = (f"set task.model_id to a local directory (e.g. one saved with save_pretrained), or run once where "
           f"the hub is reachable so that HF_HUB_OFFLINE=1 can use the cached '{model_id}'")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    endpoint = os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT
    online = not offline and _hub_reachable(endpoint)
    try:
        found = hub.snapshot_download(model_id, allow_patterns=SNAPSHOT_PATTERNS, local_files_only=not online,
                                      etag_timeout=HUB_PROBE_TIMEOUT_S)
    except hub.errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({endpoint}) is unreachable"
        raise ConfigError(f"task.model_id={model_id} is not in the local hub cache and {why}: {fix}") from None
    except (hub.errors.RepositoryNotFoundError, hub.errors.GatedRepoError) as exc:
        raise ConfigError(f"task.model_id={model_id}: {type(exc).__name__} (private, gated or misspelt); log in "
                          "with `hf auth login` or fix the id") from None
    except (hub.errors.HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"task.model_id={model_id} could not be fetched ({type(exc).__name__}): {fix}") from None
    check_model_dir(Path(found))
    return Path(found)


def check_model_dir(path: Path) -> None:
    """Raise DataError naming what a save_pretrained directory lacks (config, weights, tokenizer)."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (model.safetensors)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json)")
    if missing:
        raise DataError(f"model directory {path} lacks {', '.join(missing)}: save both model and tokenizer with "
                        "save_pretrained(dir) into it")


def load_config(path: Path):
    """The model's transformers config; an architecture transformers does not know is a ConfigError."""
    transformers = require("transformers", "hf", "Hugging Face tasks")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        raise ConfigError(f"{path}/config.json: model_type {kind!r} is not an architecture transformers "
                          f"{transformers.__version__} knows ({str(exc).splitlines()[0][:120]}): upgrade "
                          "transformers or use a supported model") from None


def load_tokenizer(path: Path, config: Any):
    """The fast tokenizer saved with the model; it must not have more tokens than the model has embeddings."""
    transformers = require("transformers", "hf", "Hugging Face tasks")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for broken tokenizer files
        raise DataError(f"the tokenizer in {path} cannot be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): save it with "
                        "tokenizer.save_pretrained(dir) beside the model") from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"the tokenizer in {path} is not a fast (tokenizers) tokenizer: save one with "
                        "tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir))")
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None and len(tokenizer) > rows:
        raise DataError(f"tokenizer/model mismatch in {path}: the tokenizer has {len(tokenizer)} tokens but the "
                        f"model embeds only {rows}; use the tokenizer the model was trained with (or resize the "
                        "model's embeddings and save it again)")
    return tokenizer


def tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer as JSON text (what makes its ids), for cache keys and serving metadata."""
    return tokenizer.backend_tokenizer.to_str()


def jsonl_records(path: Path, content: str, shape: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file's ``content``; a line that is not JSON
    is a DataError naming it and the expected ``shape`` (e.g. '{"text": ...}')."""
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not JSON ({exc.msg}): write one {shape} per line") from None


def content_digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def max_positions(config: Any) -> int | None:
    """How many positions the model was built for (None: unbounded, e.g. some rotary models without a limit)."""
    text = config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(text, name, None), int):
            return int(getattr(text, name))
    return None


class HFTask(Task):
    """What both HF tasks share: the model source, tokenizer, LoRA training and the fine-tuning space."""

    reads_model_id: ClassVar[bool] = True
    train_space = FINETUNE_SPACE

    def __init__(self, data: str | None = None, cache_dir: Path | str = ".cache/autoglm", seed: int = 1337,
                 model_id: str | None = None):
        super().__init__(data=data, cache_dir=cache_dir, seed=seed)
        if data is None:
            raise ConfigError(f"task '{self.name}' needs task.data: {self.data_help}")
        if not model_id:
            resolve_model_dir(model_id, self.name)  # the error naming task.model_id
        self.model_id = model_id

    data_help: ClassVar[str] = ""  # what task.data may be, for the error when it is unset

    @cached_property
    def model_dir(self) -> Path:
        return resolve_model_dir(self.model_id, self.name)

    @cached_property
    def hf_config(self) -> Any:
        return load_config(self.model_dir)

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.model_dir, self.hf_config)

    def _build(self, model_args: Mapping[str, Any], auto_class: str, config_updates: Mapping[str, Any] = (),
               **kwargs: Any) -> torch.nn.Module:
        """The pretrained model (``auto_class`` of transformers, float32, ``config_updates`` set on its config)
        wrapped as :class:`HFModel`."""
        import copy

        import torch

        from autoglm.tasks.hf_model import HFModel

        args = self.check_model_args(model_args)
        transformers = require("transformers", "hf", "Hugging Face tasks")
        config = copy.deepcopy(self.hf_config)
        for key, value in dict(config_updates).items():
            setattr(config, key, value)
        torch.manual_seed(self.seed)  # a new head (e.g. other labels) starts the same every time
        try:
            hf, info = getattr(transformers, auto_class).from_pretrained(
                self.model_dir, config=config, dtype=torch.float32, output_loading_info=True, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"task '{self.name}' cannot load {self.model_id} ({self.hf_config.model_type}) as "
                              f"{auto_class.removeprefix('AutoModelFor')}: {str(exc).splitlines()[0][:160]}") from None
        causal = auto_class == "AutoModelForCausalLM"
        missing = sorted(info.get("missing_keys") or ())
        if causal and missing:  # e.g. an encoder's directory: transformers would add an untrained LM head
            raise ConfigError(f"task '{self.name}': {self.model_id} holds no causal LM ({len(missing)} weights missing, "
                              f"e.g. {missing[0]}): use a model saved as *ForCausalLM, or task.name="
                              "'hf-sequence-classification' for an encoder")
        return HFModel(hf.eval(), causal=causal, model_args=args)

    @contextmanager
    def training(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """LoRA adapters on ``model`` while it trains, if model_args ask for them; merged back afterwards."""
        from autoglm.tasks.hf_model import apply_lora, merge_lora

        apply_lora(model)
        try:
            yield model
        finally:
            merge_lora(model)
