#!/usr/bin/env python3
"""Load generator for bench/batch/run.sh (issue P2.2): interactive streaming chat traffic
beside a batch, through Fulcrum's Batch API or from a naive thread pool.

Subcommands:
  capacity   closed-loop streaming chat requests through the proxy at increasing
             concurrency; prints the requests/s of each level and the peak (JSON).
  make-batch writes the batch input (JSONL, OpenAI Batch API lines).
  phase      open-loop Poisson interactive traffic for --seconds, alone, beside a Fulcrum
             batch (--mode fulcrum) or beside a naive thread pool (--mode naive); writes
             TTFT percentiles, errors and the batch's throughput (JSON).
  naive      the naive client: --workers threads sending the batch file's requests straight
             to the backends, round robin; run by `phase --mode naive` as its own process.
  report     the Markdown table from the phases' JSON files.

Every request has the same shape: one user message of --prompt-chars characters of seeded
random words (about a quarter as many tokens, no shared prefix) and max_tokens
--max-tokens. Interactive requests stream ("stream": true); batch requests do not.
TTFT is measured from just before the request is written to the first byte of the response
body (the mock's first SSE event carries the first token).
"""

import argparse
import asyncio
import http.client
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

MODEL = "mock-llm"
WORDS = None


def words():
    global WORDS
    if WORDS is None:
        rng = random.Random(12345)
        letters = "abcdefghijklmnopqrstuvwxyz"
        WORDS = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4096)]
    return WORDS


def prompt(rng, chars):
    w = words()
    out, n = [], 0
    while n < chars:
        x = rng.choice(w)
        out.append(x)
        n += len(x) + 1
    return " ".join(out)[:chars]


def chat_body(rng, chars, max_tokens, stream):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt(rng, chars)}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return body


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --- one streaming request ---------------------------------------------------------------

async def stream_one(session, url, payload, timeout):
    """Returns (ok, ttft_s, e2e_s, reason)."""
    import aiohttp

    t0 = time.perf_counter()
    ttft = None
    try:
        async with session.post(url, data=payload, headers={"content-type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                await resp.read()
                return False, None, time.perf_counter() - t0, f"status {resp.status}"
            tail = b""
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tail = (tail + chunk)[-64:]
            e2e = time.perf_counter() - t0
            if b"[DONE]" not in tail:
                return False, ttft, e2e, "stream cut"
            return True, ttft, e2e, None
    except asyncio.TimeoutError:
        return False, ttft, time.perf_counter() - t0, "timeout"
    except Exception as e:  # connection errors
        return False, ttft, time.perf_counter() - t0, type(e).__name__


def new_session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))


# --- capacity ----------------------------------------------------------------------------

async def capacity_level(url, conc, warmup, seconds, chars, max_tokens, seed):
    rng = random.Random(seed)  # every request a fresh prompt: no prefix-cache hits
    done = []
    errors = 0
    stop = False
    async with new_session() as s:
        async def worker(i):
            nonlocal errors
            while not stop:
                payload = json.dumps(chat_body(rng, chars, max_tokens, True)).encode()
                ok, _, _, _ = await stream_one(s, url, payload, 30)
                if ok:
                    done.append(time.perf_counter())
                else:
                    errors += 1
        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(i)) for i in range(conc)]
        await asyncio.sleep(warmup + seconds)
        stop = True
        await asyncio.gather(*tasks)
    a, b = start + warmup, start + warmup + seconds
    n = sum(1 for t in done if a <= t < b)
    return n / seconds, errors


def cmd_capacity(args):
    levels = [int(x) for x in args.levels.split()]
    rows, peak, flat = [], 0.0, 0
    for c in levels:
        url = args.url.rstrip("/") + "/v1/chat/completions"
        rps, errors = asyncio.run(capacity_level(url, c, args.warmup, args.seconds,
                                                 args.prompt_chars, args.max_tokens, args.seed + c))
        rows.append({"concurrency": c, "rps": rps, "errors": errors})
        print(f"   concurrency {c:4d}: {rps:7.1f} requests/s, {errors} errors", file=sys.stderr, flush=True)
        if rps > peak * (1 + args.min_gain):
            flat = 0
        else:
            flat += 1
        peak = max(peak, rps)
        if flat >= args.patience:
            break
    out = {"levels": rows, "capacity": peak, "warmup": args.warmup, "seconds": args.seconds,
           "min_gain": args.min_gain, "patience": args.patience}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{peak:.2f}")


# --- batch input -------------------------------------------------------------------------

def cmd_make_batch(args):
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for i in range(args.n):
            body = chat_body(rng, args.prompt_chars, args.max_tokens, False)
            if args.priority is not None:
                body["priority"] = args.priority  # the engine's scheduling priority (vLLM, SGLang)
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            f.write(json.dumps(line) + "\n")


# --- the naive client --------------------------------------------------------------------

def cmd_naive(args):
    backends = args.backends.split(",")
    bodies = []
    with open(args.batch_file) as f:
        for line in f:
            bodies.append(json.dumps(json.loads(line)["body"]).encode())
    next_req = itertools.count()  # next() is atomic under the GIL
    next_backend = itertools.count()
    stamps = []  # monotonic times of 2xx answers
    errors = []
    stop = threading.Event()

    def worker():
        conns = {}
        while not stop.is_set():
            i = next(next_req)
            if i >= len(bodies):
                return
            addr = backends[next(next_backend) % len(backends)]
            conn = conns.get(addr)
            if conn is None:
                host, port = addr.rsplit(":", 1)
                conn = conns[addr] = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                conn.request("POST", "/v1/chat/completions", bodies[i], {"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    stamps.append(time.monotonic())
                else:
                    errors.append(time.monotonic())
            except Exception:
                errors.append(time.monotonic())
                conn.close()
                conns.pop(addr, None)

    def finish(*_):
        stop.set()
        with open(args.out, "w") as f:
            json.dump({"stamps": list(stamps), "errors": list(errors), "sent": min(next(next_req), len(bodies))}, f)
        os._exit(0)

    signal.signal(signal.SIGTERM, finish)
    parent = os.getppid()

    def orphaned():  # the phase that started this process is gone: stop too
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    print("naive client running", file=sys.stderr, flush=True)
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    finish()


# --- a phase -----------------------------------------------------------------------------

async def api(session, method, url, **kw):
    async with session.request(method, url, **kw) as r:
        body = await r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {url}: {r.status} {body[:300]!r}")
        return json.loads(body)


def cpu_times():
    """The machine's CPU times (the cpu line of /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


async def fleet_metrics(session, backends):
    """The backends' /metrics, summed by metric name (labels dropped)."""
    total = {}
    for b in backends:
        async with session.get(f"http://{b}/metrics") as r:
            text = (await r.read()).decode()
        for line in text.splitlines():
            if line.startswith("vllm:") and " " in line:
                name = line.split("{", 1)[0].split(" ", 1)[0]
                try:
                    total[name] = total.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
    return total


async def sample_engines(session, backends, samples):
    """Every 0.5 s: sequences running and waiting, summed over the fleet."""
    while True:
        await asyncio.sleep(0.5)
        try:
            m = await fleet_metrics(session, backends)
        except Exception:
            continue
        samples.append((m.get("vllm:num_requests_running", 0.0), m.get("vllm:num_requests_waiting", 0.0)))


def done_count(b):
    c = b.get("request_counts") or {}
    return c.get("completed", 0), c.get("failed", 0)


async def run_phase(args):
    import aiohttp

    base = args.url.rstrip("/")
    chat_url = base + "/v1/chat/completions"
    # The interactive traffic: the same arrival times in every phase (seeded).
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(args.rate)
        if t >= args.seconds:
            break
        arrivals.append(t)
    # Prompts: the same lengths in every phase, but their own words (--prompt-seed), so that no
    # phase finds the prompts of another in the engines' prefix caches.
    prng = random.Random(args.prompt_seed * 1_000_003 + args.seed)
    payloads = [json.dumps(chat_body(prng, args.prompt_chars, args.max_tokens, True)).encode() for _ in arrivals]

    out = {"mode": args.mode, "rate": args.rate, "seconds": args.seconds, "seed": args.seed,
           "prompt_seed": args.prompt_seed, "offered": len(arrivals)}
    backends = [b for b in args.backends.split(",") if b]
    engine_samples = []
    naive = None
    batch_id = None
    async with new_session() as s:
        # Start the batch and let it reach its steady state.
        if args.mode == "fulcrum":
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", open(args.batch_file, "rb"), filename="batch.jsonl",
                           content_type="application/jsonl")
            t_up = time.monotonic()
            f = await api(s, "POST", base + "/v1/files", data=form)
            b = await api(s, "POST", base + "/v1/batches", json={
                "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
            batch_id = b["id"]
            out["batch_id"] = batch_id
            out["batch_total"] = (b.get("request_counts") or {}).get("total")
            out["upload_and_create_s"] = time.monotonic() - t_up
            if b["status"] not in ("validating", "in_progress"):
                raise RuntimeError(f"batch {batch_id} is {b['status']}: {b.get('errors')}")
        elif args.mode == "naive":
            naive_out = args.out + ".naive"
            naive = subprocess.Popen([sys.executable, os.path.abspath(__file__), "naive",
                                      "--backends", args.backends, "--workers", str(args.workers),
                                      "--batch-file", args.batch_file, "--out", naive_out])
        if args.mode != "alone":
            await asyncio.sleep(args.batch_warmup)

        async def batch_counts():
            return done_count(await api(s, "GET", f"{base}/v1/batches/{batch_id}"))

        if args.mode == "fulcrum":
            c0 = await batch_counts()
        m0 = await fleet_metrics(s, backends)
        cpu0 = cpu_times()
        w0 = time.monotonic()
        sampling = asyncio.create_task(sample_engines(s, backends, engine_samples))

        # Open loop: each arrival at its time, whatever the answers do.
        results = [None] * len(arrivals)
        lag = []

        async def one(i):
            results[i] = await stream_one(s, chat_url, payloads[i], args.timeout)

        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(max(0.0, loop.time() - (start + at)))
            tasks.append(asyncio.create_task(one(i)))
        # The arrivals end at --seconds; wait for the window's end, then for the last answers.
        end = start + args.seconds
        if end > loop.time():
            await asyncio.sleep(end - loop.time())
        w1 = time.monotonic()
        if args.mode == "fulcrum":
            c1 = await batch_counts()
        m1 = await fleet_metrics(s, backends)
        cpu1 = cpu_times()
        sampling.cancel()
        await asyncio.gather(*tasks)

        # The batch's throughput over the interactive window.
        if args.mode == "fulcrum":
            out["batch_completed"] = c1[0] - c0[0]
            out["batch_failed"] = c1[1] - c0[1]
            out["batch_rps"] = (c1[0] - c0[0]) / (w1 - w0)
            await api(s, "POST", f"{base}/v1/batches/{batch_id}/cancel")
            for _ in range(300):
                b = await api(s, "GET", f"{base}/v1/batches/{batch_id}")
                if b["status"] in ("cancelled", "completed", "failed", "expired"):
                    break
                await asyncio.sleep(0.1)
            out["batch_final_status"] = b["status"]
            out["batch_final_counts"] = b.get("request_counts")
        elif args.mode == "naive":
            naive.send_signal(signal.SIGTERM)
            naive.wait(timeout=30)
            with open(naive_out) as f:
                nv = json.load(f)
            os.unlink(naive_out)
            n = sum(1 for x in nv["stamps"] if w0 <= x < w1)
            out["batch_completed"] = n
            out["batch_failed"] = sum(1 for x in nv["errors"] if w0 <= x < w1)
            out["batch_rps"] = n / (w1 - w0)
            out["naive_sent"] = nv["sent"]
            out["workers"] = args.workers

    queries = m1.get("vllm:prefix_cache_queries_total", 0) - m0.get("vllm:prefix_cache_queries_total", 0)
    hits = m1.get("vllm:prefix_cache_hits_total", 0) - m0.get("vllm:prefix_cache_hits_total", 0)
    out["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    dt = [b - a for a, b in zip(cpu0, cpu1)]
    out["cpu_busy"] = 1 - (dt[3] + dt[4]) / max(1, sum(dt))  # idle + iowait
    out["cpu_steal"] = (dt[7] if len(dt) > 7 else 0) / max(1, sum(dt))
    if engine_samples:
        out["engine_running_mean"] = sum(x[0] for x in engine_samples) / len(engine_samples)
        out["engine_waiting_mean"] = sum(x[1] for x in engine_samples) / len(engine_samples)
    ok = [r for r in results if r[0]]
    ttft = [r[1] for r in ok]
    e2e = [r[2] for r in ok]
    reasons = {}
    for r in results:
        if not r[0]:
            reasons[r[3]] = reasons.get(r[3], 0) + 1
    out.update({
        "window_s": w1 - w0,
        "served": len(ok),
        "errors": len(results) - len(ok),
        "error_reasons": reasons,
        "ttft_p50_ms": pct(ttft, 50) * 1000,
        "ttft_p90_ms": pct(ttft, 90) * 1000,
        "ttft_p99_ms": pct(ttft, 99) * 1000,
        "e2e_p50_ms": pct(e2e, 50) * 1000,
        "e2e_p99_ms": pct(e2e, 99) * 1000,
        "client_lag_p99_ms": pct(lag, 99) * 1000,
        "client_lag_max_ms": max(lag) * 1000 if lag else 0.0,
    })
    return out


def cmd_phase(args):
    out = asyncio.run(run_phase(args))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    b = f", batch {out['batch_rps']:.1f} req/s" if "batch_rps" in out else ""
    print(f"   {args.mode}: {out['served']}/{out['offered']} interactive served, TTFT p50 "
          f"{out['ttft_p50_ms']:.1f} ms, p99 {out['ttft_p99_ms']:.1f} ms, {out['errors']} errors{b}",
          file=sys.stderr, flush=True)


# --- report ------------------------------------------------------------------------------

def cmd_report(args):
    cap = json.load(open(args.capacity))["capacity"]
    phases = [(label, json.load(open(path))) for label, path in
              (x.split("=", 1) for x in args.phases)]
    alone = phases[0][1]
    lines = ["| phase | interactive req/s offered | served | TTFT p50 | TTFT p99 | p99 vs alone | errors | batch req/s | batch share of remaining capacity |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, p in phases:
        offered = p["offered"] / p["seconds"]
        served = p["served"] / p["seconds"]
        ratio = p["ttft_p99_ms"] / alone["ttft_p99_ms"]
        remaining = cap - p["rate"]
        if "batch_rps" in p:
            brps = f"{p['batch_rps']:.1f}"
            share = f"{100 * p['batch_rps'] / remaining:.0f}%"
        else:
            brps, share = "-", "-"
        errors = str(p["errors"])
        if p.get("batch_failed"):
            errors += f" (batch: {p['batch_failed']})"
        lines.append(f"| {label} | {offered:.1f} | {served:.1f} | {p['ttft_p50_ms']:.1f} ms | "
                     f"{p['ttft_p99_ms']:.1f} ms | {ratio:.2f}x | {errors} | {brps} | {share} |")
    print("\n".join(lines))
    print()
    print("| phase | TTFT p90 | end-to-end p50 | end-to-end p99 | sequences running / waiting (fleet mean) | prefix-cache hit rate | machine CPU busy | client send lag p99 / max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, p in phases:
        eng = (f"{p['engine_running_mean']:.1f} / {p['engine_waiting_mean']:.1f}"
               if "engine_running_mean" in p else "-")
        print(f"| {label} | {p['ttft_p90_ms']:.1f} ms | {p['e2e_p50_ms']:.1f} ms | {p['e2e_p99_ms']:.1f} ms | "
              f"{eng} | {100 * p['prefix_cache_hit_rate']:.1f}% | {100 * p['cpu_busy']:.0f}% | "
              f"{p['client_lag_p99_ms']:.1f} / {p['client_lag_max_ms']:.1f} ms |")


def cmd_levels(args):
    d = json.load(open(args.capacity))
    print(", ".join(f"{l['concurrency']}: {l['rps']:.1f}" for l in d["levels"]))


def cmd_notes(args):
    a, b, c = (json.load(open(x)) for x in (args.alone, args.fulcrum, args.naive))
    print(f"Fulcrum batch {b['batch_id']}: {b['batch_total']} requests, upload and create "
          f"{b['upload_and_create_s']:.1f} s, {b['batch_completed']} completed and {b['batch_failed']} failed "
          f"in the window; after the cancel: {b['batch_final_status']}, {b['batch_final_counts']}.")
    print(f"Naive client: {c['batch_completed']} completed and {c['batch_failed']} failed in the window, "
          f"{c['naive_sent']} sent in all.")
    for name, p in (("A", a), ("B", b), ("C", c)):
        if p["error_reasons"]:
            print(f"Interactive errors in {name}: {p['error_reasons']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def shape(p):
        p.add_argument("--prompt-chars", type=int, default=1600)
        p.add_argument("--max-tokens", type=int, default=32)

    p = sub.add_parser("capacity")
    p.add_argument("--url", required=True)
    p.add_argument("--levels", default="4 8 12 16 24 32 48 64 96 128")
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--min-gain", type=float, default=0.03)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True)
    shape(p)
    p.set_defaults(fn=cmd_capacity)

    p = sub.add_parser("make-batch")
    p.add_argument("--priority", type=int, default=None, help="a priority in every body (the naive client's)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=99)
    p.add_argument("--out", required=True)
    shape(p)
    p.set_defaults(fn=cmd_make_batch)

    p = sub.add_parser("naive")
    p.add_argument("--backends", required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--batch-file", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_naive)

    p = sub.add_parser("phase")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=["alone", "fulcrum", "naive"], required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--batch-file")
    p.add_argument("--batch-warmup", type=float, default=5)
    p.add_argument("--backends", default="")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--out", required=True)
    shape(p)
    p.set_defaults(fn=cmd_phase)

    p = sub.add_parser("report")
    p.add_argument("--capacity", required=True)
    p.add_argument("phases", nargs="+", help="LABEL=FILE, the first being the phase alone")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("levels")
    p.add_argument("--capacity", required=True)
    p.set_defaults(fn=cmd_levels)

    p = sub.add_parser("notes")
    p.add_argument("--alone", required=True)
    p.add_argument("--fulcrum", required=True)
    p.add_argument("--naive", required=True)
    p.set_defaults(fn=cmd_notes)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
