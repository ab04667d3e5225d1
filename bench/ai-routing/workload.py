#!/usr/bin/env python3
"""Shared-prefix, multi-turn, streaming chat workload for bench/ai-routing/run.sh.

Many conversations share a few long system prompts; each conversation runs several turns,
and every turn resends the whole history (as chat clients do), streaming the answer. Prints
one JSON object: requests, failures, wall time, throughput, time-to-first-token and
end-to-end percentiles (client side).
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


async def conversation(session, args, conv, systems, sem, stats):
    rng = random.Random(args.seed * 1000 + conv)
    messages = [{"role": "system", "content": systems[conv % len(systems)]}]
    async with sem:
        for turn in range(args.turns):
            messages.append({"role": "user", "content": text(rng, args.user_tokens)})
            body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens, "messages": messages}
            t0 = time.perf_counter()
            ttft, answer, ok = None, [], False
            try:
                async with session.post(args.url + "/v1/chat/completions", json=body) as resp:
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
                                delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
                                if delta:
                                    if ttft is None:
                                        ttft = time.perf_counter() - t0
                                    answer.append(delta)
                    else:
                        await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                ok = False
            e2e = time.perf_counter() - t0
            if ok:
                stats["ttft"].append(ttft if ttft is not None else e2e)
                stats["e2e"].append(e2e)
                stats["tokens"] += len(answer)
                stats["ok"] += 1
            else:
                stats["failed"] += 1
            messages.append({"role": "assistant", "content": "".join(answer)})


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="llama")
    p.add_argument("--conversations", type=int, default=96)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--user-tokens", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    rng = random.Random(args.seed)
    systems = [f"[system prompt {i}] " + text(rng, args.system_tokens) for i in range(args.system_prompts)]
    stats = {"ttft": [], "e2e": [], "tokens": 0, "ok": 0, "failed": 0}
    sem = asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(conversation(session, args, c, systems, sem, stats) for c in range(args.conversations)))
    wall = time.perf_counter() - t0
    print(json.dumps({
        "requests": stats["ok"],
        "failed": stats["failed"],
        "wall_s": round(wall, 3),
        "req_per_s": round(stats["ok"] / wall, 2),
        "tokens_per_s": round(stats["tokens"] / wall, 1),
        "ttft_p50_ms": round(1000 * pct(stats["ttft"], 0.50), 1),
        "ttft_p99_ms": round(1000 * pct(stats["ttft"], 0.99), 1),
        "e2e_p99_ms": round(1000 * pct(stats["e2e"], 0.99), 1),
    }))


if __name__ == "__main__":
    asyncio.run(main())
