"""The canary split in the gateway (fake Triton): sticky per client, random otherwise, re-read when the routing
file changes, per-version metrics; and the automatic rollback's judgement of a window."""

import math

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.config import CanarySettings, load_settings
from autoglm.errors import ConfigError
from serve.canary_watch import CanaryWatch, Window, verdict
from serve.gateway.canary import POLL_S, Routing, Split, write_routing
from tests.serve.asgi import gateway_client as client
from tests.serve.fakes import fake_gateway

IMAGE = orjson.dumps({"images": [[[3.0] * 8] * 8]})
V2 = orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [3.0] * 64}]})


def test_a_client_keeps_its_version_and_distinct_clients_split_by_the_weight():
    split = Split(stable=1, canary=2)
    assert len({split.pick(10.0, b"alice") for _ in range(50)}) == 1
    canary = sum(split.pick(10.0, f"client-{i}".encode())[1] == "canary" for i in range(4000))
    assert abs(canary - 400) <= 4 * math.sqrt(4000 * 0.1 * 0.9)
    assert Split(stable=3).pick(99.0, b"alice") == (3, "stable")  # no canary: always the stable one


def test_routing_follows_the_file_within_its_poll_interval_and_survives_a_broken_one(tmp_path):
    path, now = tmp_path / "routing.json", [0.0]
    write_routing(path, {"m": Split(1)}, 0.0)
    routing = Routing(path, clock=lambda: now[0])
    assert routing.pick("m", None) == (1, "stable") and routing.pick("other", None) is None
    write_routing(path, {"m": Split(1, 2)}, 100.0)
    assert routing.pick("m", None) == (1, "stable")  # not re-read yet
    now[0] += POLL_S * 1.5
    assert routing.pick("m", None) == (2, "canary")
    path.write_text("{not json")
    now[0] += POLL_S * 1.5
    assert routing.pick("m", None) == (2, "canary")  # the last good routing stays
    assert Routing(None).pick("m", None) is None  # no file configured: unversioned


def test_versions_move_while_a_canary_is_on_or_a_switch_is_under_way(tmp_path):
    path, now = tmp_path / "routing.json", [0.0]
    routing = Routing(path, clock=lambda: now[0])
    assert not routing.versions_moving()  # no file yet
    for models, extra, moving in (({"m": Split(1)}, {}, False), ({"m": Split(1)}, {"settling": True}, True),
                                  ({"m": Split(1, 2)}, {"settling": False}, True), ({"m": Split(2)}, {}, False)):
        write_routing(path, models, 10.0, **extra)
        now[0] += POLL_S * 1.5
        assert routing.versions_moving() is moving, (models, extra)
    assert not Routing(None).versions_moving()


@pytest.mark.anyio
async def test_the_gateway_addresses_versions_and_labels_its_metrics_by_version(tmp_path):
    path = tmp_path / "routing.json"
    write_routing(path, {"digits-fp32": Split(1, 2)}, 50.0)
    gw, triton = fake_gateway(routing_file=path)
    async with client(gw) as c:
        for i in range(40):
            reply = await c.post("/v1/models/digits:predict", body=IMAGE, headers={"x-client-id": f"c{i}"})
            assert reply.status == 200
        assert (await c.post("/v2/models/digits-fp32/infer", body=V2, headers={"x-client-id": "c0"})).status == 200
        assert (await c.post("/v2/models/digits-fp32/versions/1/infer", body=V2)).status == 200
        metrics = (await c.get("/metrics")).body.decode()
    targets = [t for _, t, _, _ in triton.requests if t.endswith(b"/infer")]
    assert {t for t in targets} == {b"/v2/models/digits-fp32/versions/1/infer",
                                    b"/v2/models/digits-fp32/versions/2/infer"}
    assert targets[-2] == targets[0]  # client c0 on the same version on both routes
    counts = {(s.labels["version"], s.labels["role"]): s.value for f in text_string_to_metric_families(metrics)
              for s in f.samples if s.name == "autoglm_gateway_version_requests_total"}
    assert counts[("1", "pinned")] == 1 and counts[("1", "stable")] + counts[("2", "canary")] == 41
    assert 'autoglm_gateway_canary_weight{canary="2",model="digits-fp32",stable="1"} 50.0' in metrics


@pytest.mark.anyio
async def test_failures_of_a_version_count_as_its_errors(tmp_path):
    path = tmp_path / "routing.json"
    write_routing(path, {"digits-fp32": Split(1)}, 0.0)
    gw, triton = fake_gateway(routing_file=path)
    triton.fail_status = 500
    async with client(gw) as c:
        assert (await c.post("/v1/models/digits:predict", body=IMAGE)).status == 502
        metrics = (await c.get("/metrics")).body.decode()
    assert 'autoglm_gateway_version_errors_total{model="digits-fp32",role="stable",version="1"} 1.0' in metrics


RULES = CanarySettings(min_requests=20, error_margin=0.02, p95_margin=0.5, p95_slack_ms=5.0)


@pytest.mark.parametrize(("stable", "canary", "fires"), [
    (Window(1000, 1, 10.0), Window(100, 10, 10.0), "5xx"),  # 10% vs 0.1%
    (Window(1000, 10, 10.0), Window(100, 2, 10.0), None),  # 2% vs 1%: within the margin
    (Window(1000, 0, 10.0), Window(100, 0, 40.0), "p95"),  # 4x slower
    (Window(1000, 0, 1.0), Window(100, 0, 3.0), None),  # 3x, but 2 ms: noise
    (Window(1000, 0, 10.0), Window(10, 10, 10.0), None),  # too few canary requests to judge
])
def test_the_verdict_rolls_back_only_a_canary_worse_by_the_margin(stable, canary, fires):
    reason = verdict(stable, canary, RULES)
    assert (reason is None) if fires is None else (fires in reason)


def test_the_watch_judges_the_last_window_not_the_totals():
    now, scrapes = [0.0], []

    def metrics(stable: tuple[int, int], canary: tuple[int, int]) -> str:
        lines = []
        for role, version, (ok, failed) in (("stable", 1, stable), ("canary", 2, canary)):
            labels = f'model="m",role="{role}",version="{version}"'
            lines += [f'autoglm_gateway_version_requests_total{{{labels},status="200"}} {ok}',
                      f'autoglm_gateway_version_requests_total{{{labels},status="500"}} {failed}',
                      f"autoglm_gateway_version_errors_total{{{labels}}} {failed}"]
        return "\n".join(lines) + "\n"

    judge = CanaryWatch("unused", RULES.model_copy(update={"window_s": 10.0}), clock=lambda: now[0],
                        fetch=lambda: scrapes[-1])
    scrapes.append(metrics((0, 0), (0, 0)))
    assert judge.check() is None  # nothing in a window of one scrape
    fired = []
    for t in range(1, 30):  # 50 canary failures in the first second, then none
        now[0] = float(t)
        scrapes.append(metrics((100 * t, 0), (10 * t, 50)))
        fired.append(judge.check() is not None)
    assert fired == [True] * 10 + [False] * 19  # judged while the 10 s window holds the failures, then not


def test_canary_settings_refuse_a_weight_outside_0_to_100():
    with pytest.raises(ConfigError, match="serve.canary.weight"):
        load_settings(None, ["serve.canary.weight=100"])
    assert load_settings(None, ["serve.canary.version=3"]).serve.canary.weight == 10.0


def test_release_commands_switch_the_stable_version_on_disk_when_nothing_serves(settings_in, tmp_path, capsys):
    from autoglm.artifacts import RunDir, StageWriter
    from autoglm.cli import run_main
    from autoglm.versions import load_lineage
    from serve.release import main
    from tests.compress.test_versions import publish

    settings = settings_in("run.name=v")
    run = RunDir(settings.run.root, "v")
    StageWriter(run, "compress", {}).commit()
    publish(settings, run, tmp_path, b"first ")
    publish(settings, run, tmp_path, b"second ")
    args = ["--set", f"run.root='{settings.run.root}'", "--run", "v"]
    repo = run.stage_dir("repository")

    assert run_main(main, ["promote", "1", *args]) == 0
    assert "version 1 is stable in the repository (nothing serves it) (was 2)" in capsys.readouterr().out
    config = (repo / "python" / "digits-fp32" / "config.pbtxt").read_text()
    assert "versions: 1\n" in config and run.state("repository") == "complete"
    assert run_main(main, ["rollback", *args]) == 0 and load_lineage(repo)["stable"] == 2
    assert run_main(main, ["promote", "9", *args]) == 2
    assert "version 9 is not in this repository's lineage (versions: 1, 2)" in capsys.readouterr().err
    assert run_main(main, ["status", *args]) == 0 and '"stable": 2' in capsys.readouterr().out
    assert run_main(main, ["status", *args[:-1], "nothing-compressed"]) == 2  # a run with no repository
    assert "run `autoglm compress` first" in capsys.readouterr().err


@pytest.mark.anyio
async def test_generation_scoring_and_openai_requests_follow_the_split(tmp_path):
    from tests.serve.fakes import CHARLM_KV

    path = tmp_path / "routing.json"
    write_routing(path, {"charlm-generate": Split(1, 2), "charlm-fp32": Split(1, 2)}, 50.0)
    gw, triton = fake_gateway(CHARLM_KV, routing_file=path)
    asks = [("/v1/models/charlm:generate", {"prompt": "ab", "max_new_tokens": 3}),
            ("/v1/models/charlm:generate", {"prompt": "ab", "max_new_tokens": 3, "stream": True}),
            ("/v1/models/fp32:generate", {"prompt": "ab", "max_new_tokens": 2}),  # recomputed: per token infers
            ("/v1/models/charlm:score", {"text": "abcdab"}),
            ("/v1/completions", {"model": "charlm", "prompt": "ab", "max_tokens": 3}),
            ("/v1/completions", {"model": "charlm", "prompt": "ab", "max_tokens": 3, "stream": True})]
    async with client(gw) as c:
        picked = {}
        for client_id in ("alice", "bob", "carol", "dave", "erin", "frank"):
            version = {"charlm-generate": Split(1, 2).pick(50.0, client_id.encode())[0]}
            for url, body in asks:
                before = len(triton.requests)
                reply = await c.post(url, json=body, headers={"x-client-id": client_id})
                assert reply.status == 200, (url, reply.body)
                targets = {t for _, t, _, _ in triton.requests[before:] if not t.endswith(b"/config")}
                assert targets and all(b"/versions/%d/" % version["charlm-generate"] in t for t in targets), targets
            picked[client_id] = version["charlm-generate"]
        metrics = (await c.get("/metrics")).body.decode()
    assert set(picked.values()) == {1, 2}  # both versions served some clients
    counts = {(s.labels["model"], s.labels["role"]): s.value for f in text_string_to_metric_families(metrics)
              for s in f.samples if s.name == "autoglm_gateway_version_requests_total"}
    assert counts[("charlm-generate", "canary")] + counts[("charlm-generate", "stable")] == 6 * 4
    assert counts[("charlm-fp32", "canary")] + counts[("charlm-fp32", "stable")] == 6 * 2
