"""Serving speed of a pruned model beside its original, on the same engine, through `hubprune serve`.

    .venv/bin/python bench/serve.py --engine transformers [--pruned out/smollm2-24l] [--max-tokens 32]
    .venv/bin/python bench/serve.py --engine vllm

Both models sit behind one router and get the same chat prompts (greedy, ignore_eos, so every
answer is --max-tokens long). Prints, per model and concurrency (1 and 8): time to first token,
decode tokens/s per stream, p50/p95 latency and total tokens/s; then the pruned/original
throughput ratio beside the ideal L/(L-n) read from the pruned folder's hubprune.json (goal:
at least 0.9 of ideal). With vLLM it also times the same requests sent straight to each vLLM
process, interleaved with the router's, and prints the router's p50 overhead (goal <= 5 %).
Without --pruned it prunes layers 13-18 of the original into a temporary folder first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from hubprune.record import PruneRecord
from hubprune.server.config import ModelSpec, ServeConfig
from hubprune.server.launch import resolve_folder
from hubprune.server.process import ServeProcess

PROMPTS = ["Explain how a bicycle works.", "Write a short story about a lighthouse keeper.",
           "What are the main causes of rain?", "Describe the city of Paris to a child.",
           "Give advice to someone learning to cook.", "Why is the sky blue?",
           "Summarize the history of the printing press.", "How do plants make food from sunlight?"]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    """One streamed chat request: time to first token, decode tokens/s, latency, tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and (chunk["choices"][0]["delta"].get("content") or first is None):
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return {"ttft": first - started, "latency": end - started, "tokens": tokens, "decode_tps": decode}


async def run_level(url: str, models: list[str], concurrency: int, rounds: int, max_tokens: int) -> dict:
    """Waves of ``concurrency`` simultaneous requests, the models taking turns wave by wave (so both see the
    same machine), ``rounds`` waves each after a warm-up wave: medians and the total tokens/s per model."""
    results = {m: [] for m in models}
    walls = dict.fromkeys(models, 0.0)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency)) as client:
        for wave in range(rounds + 1):
            for model in (models if wave % 2 == 0 else models[::-1]):
                started = time.perf_counter()
                batch = await asyncio.gather(*(one(client, url, model, PROMPTS[(wave * concurrency + i) % len(PROMPTS)],
                                                   max_tokens, {}) for i in range(concurrency)))
                if wave:  # wave 0 warms up
                    walls[model] += time.perf_counter() - started
                    results[model] += batch
    out = {}
    for model, rs in results.items():
        latencies = sorted(r["latency"] for r in rs)
        out[model] = {"ttft_ms": 1000 * statistics.median(r["ttft"] for r in rs),
                      "decode_tps": statistics.median(r["decode_tps"] for r in rs), "p50": statistics.median(latencies),
                      "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
                      "total_tps": sum(r["tokens"] for r in rs) / walls[model]}
    return out


async def overhead(direct: dict[str, tuple[str, dict]], router: str, n: int, max_tokens: int) -> list[str]:
    """p50 latency and TTFT through the router against straight to vLLM, requests interleaved one at a time."""
    lines = []
    async with httpx.AsyncClient(timeout=None) as client:
        for model, (url, headers) in direct.items():
            await one(client, url, model, PROMPTS[0], max_tokens, headers)
            times = {"direct": [], "router": []}
            for i in range(n):
                order = [("direct", url, headers), ("router", router, {})]
                for name, target, h in (order if i % 2 == 0 else order[::-1]):
                    times[name].append(await one(client, target, model, PROMPTS[i % len(PROMPTS)], max_tokens, h))
            d, r = (statistics.median(x["latency"] for x in times[k]) for k in ("direct", "router"))
            dt, rt = (statistics.median(x["ttft"] for x in times[k]) for k in ("direct", "router"))
            lines.append(f"{model:>9}: p50 latency direct {d:.3f} s, router {r:.3f} s: overhead {100 * (r / d - 1):+.1f} %"
                         f" (goal <= 5 %); TTFT direct {1000 * dt:.0f} ms, router {1000 * rt:.0f} ms")
    return lines


async def start_vllm(specs: list[ModelSpec], folders: dict[str, str], log_dir: str) -> list:
    """vLLM processes started by the library (so the benchmark can also talk to them directly)."""
    from hubprune.server.vllm_engine import VLLMEngine

    python = ServeConfig(models=specs).vllm_interpreter()
    engines = [VLLMEngine(s, folder=folders[s.name], python=python, log_dir=log_dir) for s in specs]
    await asyncio.gather(*(e.start() for e in engines))
    return engines


async def close_all(engines: list) -> None:
    await asyncio.gather(*(e.close() for e in engines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--original", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--pruned", help="a folder written by hubprune prune (default: layers 13-18 dropped)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16,
                        help="timed requests per model and concurrency (at least 2 waves)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hubprune-bench-serve-"))
    pruned = args.pruned
    if pruned is None:
        from hubprune import LayerPruner

        pruned = str(work / "pruned")
        LayerPruner.from_pretrained(args.original, device="cpu").prune(layers=list(range(13, 19))).save_pretrained(pruned)
    record = PruneRecord.load(pruned)
    ideal = record.base_num_layers / record.num_layers
    specs = [ModelSpec(path=args.original, name="original", max_model_len=args.max_model_len, max_num_seqs=8),
             ModelSpec(path=pruned, name="pruned", max_model_len=args.max_model_len, max_num_seqs=8)]
    print(f"engine {args.engine}; original {args.original} ({record.base_num_layers} layers); pruned {pruned} "
          f"({record.num_layers} layers, removed {record.removed_layers}); {args.max_tokens} tokens per answer",
          flush=True)

    engines, direct, env = [], {}, {}
    serve_args = ["--engine", args.engine, "--max-model-len", str(args.max_model_len), "--max-num-seqs", "8",
                  "--log-dir", str(work / "logs")]
    if args.engine == "vllm":  # the router in front of vLLM processes the benchmark also reaches directly
        folders = {s.name: resolve_folder(s) for s in specs}
        loop = asyncio.new_event_loop()
        engines = loop.run_until_complete(start_vllm(specs, folders, str(work / "logs")))
        models = []
        for e in engines:
            key = e.client.headers["Authorization"].split()[1]
            env[f"BENCH_KEY_{e.name.upper()}"] = key
            direct[e.name] = (e.url, {"Authorization": f"Bearer {key}"})
            models.append({"name": e.name, "url": e.url, "url_api_key_env": f"BENCH_KEY_{e.name.upper()}"})
        (work / "serve.yaml").write_text(json.dumps({"models": models}))
        serve_args = ["--config", str(work / "serve.yaml")]
    else:
        serve_args = [f"original={args.original}", f"pruned={pruned}", *serve_args]
    try:
        with ServeProcess(serve_args, env=env, log_path=work / "serve.log") as server:
            rows = {}
            print(f"{'model':>9} {'conc':>4} {'TTFT ms':>8} {'decode tok/s':>12} {'p50 s':>7} {'p95 s':>7} "
                  f"{'total tok/s':>11}", flush=True)
            for c in args.concurrency:
                rounds = max(2, args.requests // c)
                level = asyncio.run(run_level(server.url, ["original", "pruned"], c, rounds, args.max_tokens))
                for model, r in level.items():
                    rows[model, c] = r
                    print(f"{model:>9} {c:>4} {r['ttft_ms']:>8.0f} {r['decode_tps']:>12.1f} {r['p50']:>7.2f} "
                          f"{r['p95']:>7.2f} {r['total_tps']:>11.1f}", flush=True)
            print(f"ideal speed-up L/(L-n) = {record.base_num_layers}/{record.num_layers} = {ideal:.3f}")
            for c in args.concurrency:
                for key, what in (("decode_tps", "decode tok/s per stream"), ("total_tps", "total tok/s")):
                    ratio = rows["pruned", c][key] / rows["original", c][key]
                    print(f"concurrency {c}: pruned/original {what}: {ratio:.3f} = {ratio / ideal:.2f} of ideal "
                          "(goal >= 0.9)")
            if direct:
                for line in asyncio.run(overhead(direct, server.url, args.requests, args.max_tokens)):
                    print(line)
    finally:
        if engines:
            loop.run_until_complete(close_all(engines))
    print(f"logs in {work}")


if __name__ == "__main__":
    sys.exit(main())
