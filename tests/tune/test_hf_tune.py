"""`autoglm tune` on the Hugging Face tasks: fine-tuning (LoRA included) and compression searched jointly.

Tiny offline models (tests/hf_fixtures.py) and three short trials per study, through tune's own stage.
"""

from __future__ import annotations

import json

import pytest

from autoglm.artifacts import RunDir
from compress import variant_names
from tests.tune import _tiny

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests import hf_fixtures  # noqa: E402 - after the skips: it imports tokenizers and transformers

N_TRIALS = 3
# searched: train.lr, model.lora_rank (LoRA always on: 4 or 8), quantize.mode, prune.ratio
COMMON = ('"model.lora_rank" = {choices = [4, 8]}, "model.lora_alpha" = 16, "model.lora_dropout" = 0.0, '
          '"train.lr" = {low = 1e-4, high = 3e-3, log = true}, "train.max_steps" = 8, "train.batch_size" = 4, '
          '"train.grad_accum" = 1, "train.warmup_frac" = 0.0, "train.weight_decay" = 0.0')
SPACES = {"llama": '{"model.block_size" = 32, "model.context" = 64, ' + COMMON + '}',
          "bert": '{"model.max_length" = 16, ' + COMMON + '}'}
FAST = ["train.eval_every=4", "train.eval_batches=2", "tune.early_stop.min_resource=4",
        "compress.prune.finetune_steps=4", "measure.batch_sizes=[1]", "compress.max_metric_loss=1.0",
        f"tune.n_trials={N_TRIALS}"]


def _task(root, kind: str) -> list[str]:
    if kind == "bert":
        return ["task.name='hf-sequence-classification'", f"task.model_id='{hf_fixtures.bert_dir()}'",
                f"task.data='{hf_fixtures.write_labelled_csv(root / 'labels.csv')}'"]
    return ["task.name='hf-causal-lm'", f"task.model_id='{hf_fixtures.llama_dir()}'",
            f"task.data='{hf_fixtures.write_text(root / 'text.txt')}'"]


@pytest.fixture(scope="module", params=sorted(SPACES))
def study(request, tmp_path_factory):
    """(kind, tune dir, manifest) of a finished three-trial study on each fixture."""
    from autoglm.config import load_settings
    from tune.stage import tune_run

    kind, root = request.param, tmp_path_factory.mktemp(request.param)
    settings = load_settings(None, _tiny.overrides(root, *_task(root, kind), *FAST, run=kind, space=SPACES[kind]))
    manifest = tune_run(settings, progress=False)
    return kind, RunDir(settings.run.root, kind).stage_dir("tune"), manifest


def test_trials_search_lora_and_compression_jointly(study):
    _, tune_dir, manifest = study
    trials = _tiny.journal_study(tune_dir).trials

    complete = [t for t in trials if t.state.name == "COMPLETE"]

    assert manifest.metrics["trials"] == N_TRIALS and complete
    assert {"train.lr", "model.lora_rank", "quantize.mode", "prune.ratio"} <= set(trials[0].params)
    for trial in complete:
        assert trial.params["model.lora_rank"] in (4, 8)
        assert trial.user_attrs["variant"]["name"] in variant_names()
        assert trial.user_attrs["variant"]["status"] != "skipped" and trial.user_attrs["variant"]["profile"]
        assert (tune_dir / f"trials/{trial.number:04d}/train.jsonl").read_text().count('"eval"') >= 1


def test_the_selection_names_a_plain_checkpoint_and_the_report_exists(study):
    from autoglm.tasks.checkpoint import load_checkpoint

    _, tune_dir, _ = study
    selected = json.loads((tune_dir / "selected.json").read_text())

    state = load_checkpoint(tune_dir / selected["checkpoint"])

    assert selected["variant"] == selected["compress"]["variants"][0]
    assert state.model_args["lora_rank"] in (4, 8)
    assert not any("lora" in key for key in state.state_dict)  # the adapters were merged before saving
    assert "<tr>" in (tune_dir / "report.html").read_text()


def test_a_model_structural_pruning_cannot_shrink_keeps_prune_ratio_off(tmp_path, caplog):
    from autoglm.tasks.hf_causal_lm import HFCausalLMTask
    from autoglm.tasks.base import Knob
    from tune.space import build_space, without_inapplicable

    task = HFCausalLMTask(data=str(hf_fixtures.write_text(tmp_path / "t.txt")), cache_dir=tmp_path,
                          model_id=str(hf_fixtures.gpt2_dir()))
    space = build_space(task, "default")

    narrowed = without_inapplicable(task, space, task.check_model_args({}))

    assert isinstance(space["prune.ratio"], Knob) and narrowed["prune.ratio"] == 0.0
    assert isinstance(narrowed["quantize.mode"], Knob)  # INT8 still applies
    assert [r.getMessage() for r in caplog.records if "prune.ratio" in r.getMessage()]
