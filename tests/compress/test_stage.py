"""The compress stage end to end: every pass through one contract, the parity gate, publishing."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import compress.variants
from autoglm.artifacts import RunDir
from autoglm.errors import AutoGLMError, ConfigError
from autoglm.train import train_run
from compress import ParityError, build_variants, variant_names
from compress.stage import compress_run
from tests.compress import _trained

FAST = ["measure.repeats=5", "measure.warmup=1", "compress.prune.finetune_steps=60", "compress.qat.steps=60",
        "compress.quantize.calibration_batches=4", "compress.exporter='legacy'", "compress.max_metric_loss=0.02"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory holding a quickly trained digits model (the train stage), shared by the tests."""
    from autoglm.config import load_settings

    root = tmp_path_factory.mktemp("runs")
    settings = load_settings(None, [f"run.root='{root}'", f"run.cache_dir='{root / 'cache'}'", "run.name=r",
                                    "train.lr=3e-3", "train.max_steps=250", "train.eval_every=250",
                                    "train.batch_size=64", "train.weight_decay=0.01", *FAST])
    train_run(settings, progress=False)
    return settings


# TensorRT needs a GPU; INT4 quantizes MatMul weights, which a CNN has none of (tests/compress/test_int4.py has them)
@pytest.mark.parametrize("name", [v for v in variant_names() if not v.startswith("trt-") and "int4" not in v])
def test_every_pass_yields_a_loadable_model_within_its_tolerance(name, tmp_path, trained_run):
    task, model = _trained.digits()
    settings = trained_run.model_copy()
    variants = build_variants(task, model, dict(model.model_args), settings, tmp_path, [name])
    by_name = {v.name: v for v in variants}
    variant = by_name[name]
    assert variant.path.is_file() and variant.path.suffix == ".onnx"
    assert variant.status == "ok", variant.reason  # within compress.max_metric_loss of torch FP32
    assert variant.metrics["accuracy"] >= 0.95
    assert set(variant.profile) == set(settings.measure.batch_sizes)
    assert variant.profile[1]["energy_method"]
    assert json.loads((tmp_path / "parity.json").read_text())[0]["passed"] is True


@pytest.mark.parametrize("name", ["int4", "pruned-int4"])
def test_int4_is_skipped_with_its_reason_on_a_model_without_matmul_weights(name, tmp_path, trained_run):
    task, model = _trained.digits()
    variant = build_variants(task, model, dict(model.model_args), trained_run, tmp_path, [name])[-1]
    assert variant.status == "skipped" and variant.path is None
    assert variant.reason.startswith("no MatMul with a constant weight to quantize")


@pytest.mark.parametrize("name", ["trt-fp16", "trt-int8"])
def test_tensorrt_is_skipped_with_its_reason_where_absent(name, tmp_path, trained_run):
    pytest.importorskip("onnxruntime")
    from compress.tensorrt import tensorrt_status

    available, reason = tensorrt_status()
    if available:
        pytest.skip("TensorRT is present: the GPU test suite builds real engines")
    task, model = _trained.digits()
    variant = build_variants(task, model, dict(model.model_args), trained_run, tmp_path, [name])[-1]
    assert variant.status == "skipped" and variant.reason == reason and variant.path is None


def test_stage_publishes_repository_then_skips_then_forces(trained_run):
    settings = trained_run.model_copy(update={"compress": trained_run.compress.model_copy(
        update={"variants": ["fp32", "int8", "pruned-int8", "trt-fp16"]})})
    run = RunDir(settings.run.root, settings.run.name)

    manifest = compress_run(settings, progress=False)

    assert run.state("compress") == run.state("repository") == "complete"
    table = json.loads((run.stage_dir("compress") / "variants.json").read_text())
    status = {row["name"]: row["status"] for row in table["variants"]}
    assert status == {"torch": "reference", "fp32": "ok", "int8": "ok", "pruned-int8": "ok", "trt-fp16": "skipped"}
    assert manifest.inputs == {"train/manifest.json": manifest.inputs["train/manifest.json"]}
    assert all(e["measured"] is False for e in manifest.energy.values())  # no NVML/RAPL here: labelled
    repo = run.manifest("repository")
    assert set(repo.metrics["models"]) == {"fp32", "int8", "pruned-int8"}
    task_info = json.loads((run.stage_dir("repository") / "task.json").read_text())
    assert task_info["task"] == "digits" and task_info["metadata"]["pixel_max"] == 16.0
    assert task_info["io"]["inputs"][0]["name"] == "image" and task_info["recommended"].startswith("digits-")
    for flavour in ("python", "native"):
        assert (run.stage_dir("repository") / flavour / "digits-int8" / "config.pbtxt").is_file()

    before = run.manifest_path("compress").stat().st_mtime_ns
    compress_run(settings, progress=False)
    assert run.manifest_path("compress").stat().st_mtime_ns == before
    compress_run(settings, force=True, progress=False)
    assert run.manifest_path("compress").stat().st_mtime_ns != before

    # fewer variants: the models no longer published leave the repository (Triton loads every folder)
    narrower = settings.model_copy(update={"compress": settings.compress.model_copy(update={"variants": ["fp32"]})})
    compress_run(narrower, progress=False)
    for flavour in ("python", "native"):
        assert sorted(p.name for p in (run.stage_dir("repository") / flavour).iterdir()) == ["digits-fp32"]
    # the train section shapes fine-tunes and the gate's batches: a change there is not "up to date"
    before = run.manifest_path("compress").stat().st_mtime_ns
    compress_run(narrower.model_copy(update={"train": narrower.train.model_copy(update={"eval_batches": 3})}),
                 progress=False)
    assert run.manifest_path("compress").stat().st_mtime_ns != before


def test_an_unknown_preset_is_refused_before_any_export(trained_run):
    quantize = trained_run.compress.quantize.model_copy(update={"preset": "fastest"})
    compress = trained_run.compress.model_copy(update={"quantize": quantize})
    settings = trained_run.model_copy(update={"run": trained_run.run.model_copy(update={"name": "preset"}),
                                              "compress": compress})
    with pytest.raises(ConfigError, match=r"compress.quantize.preset='fastest' is unknown: use one of \["):
        compress_run(settings, progress=False)
    assert RunDir(settings.run.root, "preset").state("compress") == "missing"


@pytest.mark.parametrize(("variants", "message"), [
    (["fp32", "int3"], "unknown variant(s) ['int3']: choose from ['fp32', 'int8', "),
    (["fp32", "int8-static"], "static INT8 needs calibration data: set compress.quantize.calibration_batches > 0"),
])
def test_variants_compress_cannot_build_are_refused_before_the_last_release_is_touched(trained_run, variants,
                                                                                       message):
    settings = _copy_of_trained(trained_run, f"refused-{variants[-1]}")
    compress_run(settings, progress=False)
    run = RunDir(settings.run.root, settings.run.name)
    published = run.manifest_path("compress").stat().st_mtime_ns
    quantize = settings.compress.quantize.model_copy(update={"calibration_batches": 0})
    bad = settings.model_copy(update={"compress": settings.compress.model_copy(
        update={"variants": variants, "quantize": quantize})})

    with pytest.raises(ConfigError) as refused:
        compress_run(bad, force=True, progress=False)

    assert message in str(refused.value)
    assert run.state("compress") == run.state("repository") == "complete"
    assert run.manifest_path("compress").stat().st_mtime_ns == published


def test_a_variant_whose_metric_is_nan_is_rejected(trained_run, tmp_path, monkeypatch):
    task, model = _trained.digits()
    real = task.evaluate

    def evaluate(predict, *args, **kwargs):  # the ONNX variant's scores come out NaN (torch's are real)
        metrics = real(predict, *args, **kwargs)
        return metrics if isinstance(predict, torch.nn.Module) else dict(metrics, accuracy=float("nan"))

    monkeypatch.setattr(task, "evaluate", evaluate)
    variant = build_variants(task, model, dict(model.model_args), trained_run, tmp_path, ["fp32"])[-1]
    assert variant.status == "rejected" and "nan" in variant.reason


def test_broken_export_is_caught_and_nothing_is_published(trained_run, monkeypatch, tmp_path):
    real_export = compress.variants.export_onnx

    def broken_export(model, task, model_args, path, exporter="dynamo"):
        used = real_export(model, task, model_args, path, exporter)
        graph = onnx.load(str(path))
        weight = graph.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
        onnx.save(graph, str(path))
        return used

    monkeypatch.setattr(compress.variants, "export_onnx", broken_export)
    settings = trained_run.model_copy(update={"run": trained_run.run.model_copy(update={"name": "broken"}),
                                              "compress": trained_run.compress.model_copy(
                                                  update={"checkpoint": str(_checkpoint(trained_run))})})
    with pytest.raises(ParityError, match="parity gate failed for fp32"):
        compress_run(settings, progress=False)
    run = RunDir(settings.run.root, "broken")
    assert run.state("compress") == "incomplete" and run.state("repository") == "missing"
    assert json.loads((run.stage_dir("compress") / "parity.json").read_text())[0]["passed"] is False


def _copy_of_trained(trained_run, name: str):
    """``trained_run`` under another run name, its train stage copied (so a test may break it)."""
    import shutil

    src = RunDir(trained_run.run.root, trained_run.run.name)
    shutil.copytree(src.stage_dir("train"), RunDir(trained_run.run.root, name).stage_dir("train"))
    return trained_run.model_copy(update={"run": trained_run.run.model_copy(update={"name": name}),
                                          "compress": trained_run.compress.model_copy(update={"variants": ["fp32"]})})


def test_a_bad_checkpoint_is_refused_before_the_last_release_is_touched(trained_run, tmp_path):
    settings = _copy_of_trained(trained_run, "kept")
    compress_run(settings, progress=False)
    run = RunDir(settings.run.root, "kept")
    published = sorted(p.name for p in run.stage_dir("compress").glob("*.onnx"))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")

    elsewhere = settings.compress.model_copy(update={"checkpoint": str(not_a_model)})
    bad = settings.model_copy(update={"compress": elsewhere})
    with pytest.raises(AutoGLMError, match="unreadable or corrupt"):
        compress_run(bad, progress=False)

    assert run.state("compress") == "complete" and run.state("repository") == "complete"
    assert sorted(p.name for p in run.stage_dir("compress").glob("*.onnx")) == published == ["fp32.onnx"]


def test_a_changed_trained_model_is_named_not_taken_for_a_missing_one(trained_run):
    settings = _copy_of_trained(trained_run, "changed")
    model = RunDir(settings.run.root, "changed").stage_dir("train") / "model.pt"
    model.write_bytes(model.read_bytes() + b"\0")

    with pytest.raises(AutoGLMError, match=r"train is tampered .*model\.pt.*autoglm train --force"):
        compress_run(settings, progress=False)


def test_a_dominated_variant_tune_selected_is_replaced_and_the_stage_says_so(trained_run, monkeypatch, capsys):
    """The issue's small tabular case: tune selected pruned-int8, which is slower (here its predictor waits 2 ms a
    call, as on the host where it ran at 0.016 ms against fp32's 0.008) and less accurate (pruned without
    fine-tuning) than fp32 at batch 1."""
    import shutil
    import time

    from autoglm.artifacts import StageWriter, write_atomic
    from compress.variants import VariantBuilder

    settings = _copy_of_trained(trained_run, "dominated")
    run = RunDir(settings.run.root, "dominated")
    tune = StageWriter(run, "tune", {})
    shutil.copy(_checkpoint(settings), tune.path("trials/0/model.pt"))
    selected = {"checkpoint": "trials/0/model.pt", "why": "the test's selection",
                "compress": {"variants": ["pruned-int8"], "prune": {"ratio": 0.5, "finetune_steps": 0}}}
    write_atomic(tune.path("selected.json"), json.dumps(selected).encode())
    tune.add_output("selected.json")
    tune.add_output("trials/0/model.pt")
    tune.commit()
    settings = settings.model_copy(update={
        "compress": settings.compress.model_copy(update={"max_metric_loss": 0.9}),
        "measure": settings.measure.model_copy(update={"batch_sizes": [1]}),
        "tune": settings.tune.model_copy(update={"serving_batch": 1})})
    real = VariantBuilder.predictor

    def predictor(self, variant, threads=None):
        predict = real(self, variant, threads)
        if variant.name != "pruned-int8":
            return predict

        def slower(inputs):
            time.sleep(0.002)
            return predict(inputs)

        return slower

    monkeypatch.setattr(VariantBuilder, "predictor", predictor)

    manifest = compress_run(settings, progress=False)

    table = json.loads((run.stage_dir("compress") / "variants.json").read_text())
    assert {v["name"]: v["status"] for v in table["variants"]} == {"torch": "reference", "fp32": "ok",
                                                                    "pruned-int8": "ok"}  # both published
    assert table["recommended"] == manifest.metrics["recommended"] == "fp32"
    replaced = table["recommendation"]["replaced"]
    assert replaced["variant"] == "pruned-int8" and replaced["by"] == "fp32" and replaced["source"] == "tune"
    assert replaced["why"].startswith("fp32 dominates it at batch 1 (fp32: accuracy ")
    assert table["recommendation"]["dominated_by"] == {"pruned-int8": ["fp32"]}
    assert manifest.metrics["recommendation"] == table["recommendation"]
    task_info = json.loads((run.stage_dir("repository") / "task.json").read_text())
    assert task_info["recommended"] == run.manifest("repository").metrics["recommended"] == "digits-fp32"
    assert task_info["recommendation"] == run.manifest("repository").metrics["recommendation"] == \
        table["recommendation"]
    assert "recommended fp32 in place of pruned-int8: tune selected pruned-int8, but fp32 dominates it at batch 1" \
        in capsys.readouterr().out


def test_missing_source_names_the_command(trained_run):
    settings = trained_run.model_copy(update={"run": trained_run.run.model_copy(update={"name": "empty"})})
    with pytest.raises(AutoGLMError, match="autoglm train"):
        compress_run(settings, progress=False)


@pytest.mark.integration
def test_real_triton_serves_the_published_repository_like_onnx_runtime(trained_run, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http")
    from autoglm.tasks import get_task
    from autoglm.tasks.predict import onnx_predictor
    from serve.triton import TritonServer, free_ports

    run = RunDir(trained_run.run.root, trained_run.run.name)
    if run.state("repository") != "complete":
        compress_run(trained_run, progress=False)
    model_name = run.manifest("repository").metrics["models"]["fp32"]
    images = get_task(trained_run).example_inputs(5)["image"]
    expected = onnx_predictor(run.stage_dir("compress") / "fp32.onnx")({"image": images})
    http, grpc, metrics = free_ports(3)
    server = TritonServer(run.stage_dir("repository") / "python", workdir=tmp_path, http_port=http, grpc_port=grpc,
                          metrics_port=metrics)
    with server.start(timeout_s=90):
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        request = httpclient.InferInput("image", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        got = client.infer(model_name, [request]).as_numpy("logits")
        client.close()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _checkpoint(settings):
    return RunDir(settings.run.root, settings.run.name).stage_dir("train") / "model.pt"
