"""The torch side of the Hugging Face tasks: the logits-only wrapper and LoRA on and off.

LoRA (peft) is put on only for the duration of training and merged back after it, so whatever is
saved, reloaded from ``model_args`` or exported is a plain transformers model: no adapter nodes in an
ONNX graph, and a checkpoint's keys are the base model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from autoglm._lazy import require


class HFModel(torch.nn.Module):
    """forward(input_ids[, attention_mask]) -> logits tensor; the transformers model is ``.hf``.

    Causal LMs run without a KV cache and return (B, T, V), so the exported graph is logits only;
    classifiers return (B, n_classes)."""

    def __init__(self, hf: Any, causal: bool, model_args: Mapping[str, Any]):
        super().__init__()
        self.hf, self.causal = hf, causal
        self.model_args = dict(model_args)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.causal:
            # an explicit all-ones mask skips transformers' packed-sequence check (aten::diff, which the
            # TorchScript exporter lacks); windows are never padded
            ones = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            return self.hf(input_ids=input_ids, attention_mask=ones, use_cache=False, return_dict=False)[0]
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def apply_lora(model: torch.nn.Module) -> bool:
    """Put LoRA adapters on ``model.hf`` (in place) if its model_args ask for them; True if it did."""
    args = getattr(model, "model_args", None) or {}
    rank = int(args.get("lora_rank", 0))
    if rank == 0 or not isinstance(model, HFModel) or hasattr(model.hf, "peft_config"):
        return False
    peft = require("peft", "hf", "LoRA fine-tuning")
    config = dict(r=rank, lora_alpha=int(args.get("lora_alpha", 16)), lora_dropout=float(args.get("lora_dropout", 0.0)),
                  task_type="CAUSAL_LM" if model.causal else "SEQ_CLS")
    try:  # peft knows the attention matrices of the common families
        model.hf = peft.get_peft_model(model.hf, peft.LoraConfig(**config))
    except ValueError:  # a family peft does not know: every Linear layer but the output head
        model.hf = peft.get_peft_model(model.hf, peft.LoraConfig(target_modules="all-linear", **config))
    return True


def merge_lora(model: torch.nn.Module) -> None:
    """Fold the adapters into the base weights and drop peft: a plain transformers model again."""
    if isinstance(model, HFModel) and hasattr(model.hf, "merge_and_unload"):
        model.hf = model.hf.merge_and_unload()
        for p in model.hf.parameters():  # peft froze the base weights; later fine-tuning (pruning) trains them
            p.requires_grad_(True)


def mlp_inner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Linear layers that set each block's MLP inner width (Llama's gate/up, Bert's intermediate.dense,
    DistilBERT's ffn.lin1).

    The residual width and attention heads are tied across layers, so only these may shrink. GPT-2 keeps
    its MLP in transformers' Conv1D, which structural pruning does not know, and Phi-3 its gate and up in one
    Linear whose halves must shrink alike: they get [] (pruning refused)."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and (leaf in ("gate_proj", "up_proj", "fc1", "lin1", "w1", "w3")
                                                   or name.endswith("intermediate.dense")):
            found.append(module)
    return found
