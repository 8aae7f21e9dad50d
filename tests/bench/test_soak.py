"""The soak's open-loop client: latency counted from the schedule, so a stall is not hidden."""

import asyncio

from aiohttp import web

from bench import soak


async def _serve_with_one_stall(stall_s: float):
    seen = {"n": 0}

    async def handler(_request):
        seen["n"] += 1
        if seen["n"] == 5:
            await asyncio.sleep(stall_s)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


def test_a_stall_shows_in_the_latency_from_due_although_each_reply_after_it_is_quick(monkeypatch):
    monkeypatch.setattr(soak, "CLIENTS", 1)  # one client: its sends queue up behind the stalled reply

    async def scenario():
        runner, url = await _serve_with_one_stall(0.6)
        try:
            return await soak._paced(url, b"{}", {}, rate=20.0, seconds=2.0, window_s=2.0)
        finally:
            await runner.cleanup()

    (window,) = asyncio.run(scenario())
    assert window["errors"] == 0 and window["requests"] >= 30
    # ~12 requests fall due during the 0.6 s stall and go out late: well over 5% of the window
    assert window["p95"] > 300 and window["service_p95"] < 200
