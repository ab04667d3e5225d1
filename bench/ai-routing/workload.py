#!/usr/bin/env python3
"""Multi-turn streaming chat workload for bench/ai-routing/run.sh.

Conversations share a few long system prompts (`--system-prompts` groups); each runs
`--turns` turns, and every turn resends the whole history (as chat clients do), streaming the
answer. The next turn of a conversation is sent when the previous answer has ended, after an
exponential think time (`--think-ms`, mean).

Two modes:
- `open` (default): conversations start at Poisson times, at `--rate` requests a second
  divided by `--turns` conversations a second, for `--seconds`; every conversation started in
  that window runs all its turns. The offered load does not depend on how fast answers come
  (except that a conversation's next turn waits for its previous answer, as a person would).
- `closed`: `--concurrency` clients each run conversations back to back for `--seconds`; the
  completions a second between `--warmup` and the end are the saturation throughput
  (`bench/ai-routing/run.sh` measures the fleet's capacity this way).

Arrival times, prompts and think times come from `--seed` only, so two routers given the same
seed get the same workload. Prints one JSON object: requests, failures (by kind), time to first
token and end-to-end percentiles (client side, from the moment the request was sent), the
achieved rate, and how late the client sent requests against their schedule (a check that the
client itself kept up).
"""
import argparse
import asyncio
import json
import random
import time

import aiohttp

WORDS = ("model cache token prefix stream batch router fleet latency request answer question "
         "system prompt careful helpful policy budget window queue memory block engine").split()


def text(rng: random.Random, tokens: int) -> str:
    # About 4 characters a token, as the mock backend estimates.
    out, length = [], 0
    while length < tokens * 4:
        w = rng.choice(WORDS)
        out.append(w)
        length += len(w) + 1
    return " ".join(out)


def pct(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Stats:
    def __init__(self):
        self.ttft, self.e2e, self.done_at, self.late = [], [], [], []
        self.tokens = self.ok = 0
        self.failed = {}
        self.trace = None  # a list of per-request records with --trace

    def fail(self, kind):
        self.failed[kind] = self.failed.get(kind, 0) + 1


async def one_request(session, args, messages, stats, t_origin, conv=0, turn=0):
    body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens, "messages": messages}
    t0 = time.perf_counter()
    ttft, answer, ok, kind, rid = None, [], False, None, None
    try:
        async with session.post(args.url + "/v1/chat/completions", json=body) as resp:
            rid = resp.headers.get("x-request-id")
            if resp.status == 200:
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        line = event.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            ok = True
                            continue
                        choices = json.loads(data).get("choices") or [{}]
                        delta = choices[0].get("delta", {}).get("content")
                        if delta:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            answer.append(delta)
                if not ok:
                    kind = "stream_cut"
            else:
                await resp.read()
                kind = f"http_{resp.status}"
    except asyncio.TimeoutError:
        kind = "timeout"
    except (aiohttp.ClientError, ValueError, KeyError, IndexError) as e:
        kind = type(e).__name__
    now = time.perf_counter()
    if ok:
        stats.ttft.append(ttft if ttft is not None else now - t0)
        stats.e2e.append(now - t0)
        stats.done_at.append(now - t_origin)
        stats.tokens += len(answer)
        stats.ok += 1
    else:
        stats.fail(kind or "unknown")
    if stats.trace is not None:
        stats.trace.append({"t": round(t0 - t_origin, 4), "conv": conv, "turn": turn, "ok": ok, "error": kind,
                            "ttft_ms": round(1000 * ttft, 2) if ttft is not None else None,
                            "e2e_ms": round(1000 * (now - t0), 2), "request_id": rid})
    return "".join(answer), ok


async def conversation(session, args, conv, systems, stats, t_origin, start_at, sem=None):
    """One conversation; `start_at` is its scheduled start (seconds from t_origin)."""
    rng = random.Random(args.seed * 1_000_003 + conv)
    messages = [{"role": "system", "content": systems[rng.randrange(len(systems))]}]
    due = start_at
    for turn in range(args.turns):
        delay = t_origin + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stats.late.append(max(0.0, time.perf_counter() - (t_origin + due)))
        messages.append({"role": "user", "content": text(rng, args.user_tokens)})
        answer, ok = await one_request(session, args, messages, stats, t_origin, conv, turn)
        if not ok:
            return
        messages.append({"role": "assistant", "content": answer})
        think = rng.expovariate(1000.0 / args.think_ms) if args.think_ms > 0 else 0.0
        due = time.perf_counter() - t_origin + think


async def open_loop(session, args, systems, stats, t_origin):
    rng = random.Random(args.seed)
    conv_rate = args.rate / args.turns
    tasks, t, conv = [], rng.expovariate(conv_rate), 0
    while t < args.seconds:
        tasks.append(asyncio.ensure_future(conversation(session, args, conv, systems, stats, t_origin, t)))
        conv += 1
        t += rng.expovariate(conv_rate)
    await asyncio.gather(*tasks)
    return conv


async def closed_loop(session, args, systems, stats, t_origin):
    counter = [0]

    async def client():
        while time.perf_counter() - t_origin < args.seconds:
            conv = counter[0]
            counter[0] += 1
            await conversation(session, args, conv, systems, stats, t_origin, time.perf_counter() - t_origin)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return counter[0]


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="llama")
    p.add_argument("--mode", choices=["open", "closed"], default="open")
    p.add_argument("--rate", type=float, default=10.0, help="open loop: requests a second offered")
    p.add_argument("--seconds", type=float, default=20.0, help="window of conversation starts")
    p.add_argument("--concurrency", type=int, default=32, help="closed loop: clients")
    p.add_argument("--warmup", type=float, default=3.0, help="closed loop: seconds not counted")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--think-ms", type=float, default=200.0, help="mean think time between turns")
    p.add_argument("--system-prompts", type=int, default=4, help="prompt groups (shared system prompts)")
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--user-tokens", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--trace", help="write one JSON line per request here (send time, TTFT, x-request-id)")
    args = p.parse_args()
    rng = random.Random(1234)  # the prompts are the same whatever the seed
    systems = [f"[system prompt {i}] " + text(rng, args.system_tokens) for i in range(args.system_prompts)]
    stats = Stats()
    if args.trace:
        stats.trace = []
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    t_origin = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if args.mode == "open":
            conversations = await open_loop(session, args, systems, stats, t_origin)
        else:
            conversations = await closed_loop(session, args, systems, stats, t_origin)
    wall = time.perf_counter() - t_origin
    failed = sum(stats.failed.values())
    out = {
        "mode": args.mode,
        "conversations": conversations,
        "requests": stats.ok,
        "failed": failed,
        "failures": stats.failed,
        "wall_s": round(wall, 3),
        "req_per_s": round(stats.ok / wall, 2),
        "tokens_per_s": round(stats.tokens / wall, 1),
        "ttft_p50_ms": round(1000 * pct(stats.ttft, 0.50), 1),
        "ttft_p90_ms": round(1000 * pct(stats.ttft, 0.90), 1),
        "ttft_p99_ms": round(1000 * pct(stats.ttft, 0.99), 1),
        "e2e_p50_ms": round(1000 * pct(stats.e2e, 0.50), 1),
        "e2e_p99_ms": round(1000 * pct(stats.e2e, 0.99), 1),
        "client_late_p99_ms": round(1000 * pct(stats.late, 0.99), 1),
        "client_late_max_ms": round(1000 * max(stats.late, default=0.0), 1),
    }
    if args.mode == "open":
        out["offered_req_per_s"] = args.rate
    else:
        window = [t for t in stats.done_at if args.warmup <= t <= args.seconds]
        out["saturated_req_per_s"] = round(len(window) / max(1e-9, args.seconds - args.warmup), 2)
    if args.trace:
        with open(args.trace, "w") as f:
            for r in stats.trace:
                f.write(json.dumps(r) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
