"""DDP trains an hf-causal-lm trial through LoRA like one process does: adapters on every rank, merged back."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests import hf_fixtures  # noqa: E402 - after the skips: it imports tokenizers and transformers


def test_two_ranks_train_lora_adapters_and_save_them_merged(tmp_path):
    from autoglm.config import load_settings
    from autoglm.ddp import launch
    from autoglm.tasks import get_task
    from autoglm.tasks.checkpoint import load_checkpoint

    overrides = ["task.name='hf-causal-lm'", f"task.model_id='{hf_fixtures.llama_dir()}'",
                 f"task.data='{hf_fixtures.write_text(tmp_path / 'text.txt')}'",
                 "task.model={block_size=32, lora_rank=4, lora_dropout=0.0}", "train.max_steps=4",
                 "train.eval_every=4", "train.batch_size=4", "train.eval_batches=1", "train.lr=1e-2",
                 "train.warmup_frac=0.0", "run.threads=1", f"run.cache_dir='{tmp_path / 'cache'}'"]
    out = tmp_path / "ddp"

    proc = launch(2, [*(a for o in overrides for a in ("--set", o)), "--out", str(out)], timeout_s=300)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((out / "result.json").read_text())["world_size"] == 2
    state = load_checkpoint(out / "model.pt")
    assert not any("lora" in key for key in state.state_dict)  # merged before rank 0 saved it
    base = get_task(load_settings(None, overrides)).build_model(state.model_args).state_dict()
    changed = [k for k, v in state.state_dict.items() if not torch.equal(v, base[k])]
    # LoRA trains the attention's query and value projections only: the rest is the pretrained model
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
