"""The HTTP gateway imports tasks: importing them must not pull in torch."""

from __future__ import annotations

from tests.autoglm._imports import imported_after


def test_task_modules_do_not_import_torch():
    code = ("import autoglm.tasks, autoglm.tasks.digits, autoglm.tasks.charlm, autoglm.tasks.corpus, "
            "autoglm.tasks.predict, autoglm.tasks.checkpoint, autoglm.tasks.training, autoglm.tasks.hf_source, "
            "autoglm.tasks.hf_causal_lm, autoglm.tasks.hf_classifier, autoglm.tasks.next_token")

    assert imported_after(code, "m in ('torch', 'onnxruntime', 'sklearn', 'transformers')") == []
