"""Benchmark: the OpenAI-compatible server under concurrent streaming clients: continuous batching vs static
batching vs one request at a time, and transformers' own OpenAI-compatible server (`transformers serve`) as the
peer where it runs.

Each server runs in its own process; the clients (lmstack.serve.loadtest, the code behind `lmstack bench serve`)
are asyncio tasks in this process, sending streaming chat requests back to back for --duration seconds with
`ignore_eos` (every request generates --max-tokens tokens, so rows compare equal work; the peer, which has no such
flag, generates until its own stop). Servers:
- `continuous`: `lmstack serve --max-batch C` (requests join the running batch at every decode step);
- `static`: `--scheduling static` (a batch admits only when empty, and runs until its longest request ends);
- `one-at-a-time`: `--max-batch 1`;
- `transformers serve` (its `--continuous-batching`), on the same weights exported to the Hugging Face format;
  it loads the weights on its first request, so that one request (only) is sent before its timed rows.
Models: the speedrun's chat model (1.4M parameters: a decode step is Python and kernel-launch bound) and a
random-weights 28M-parameter model with the same tokenizer (d_model 512, 8 layers: a step does real matmul work),
so the table shows where batching pays.

    .venv/bin/python bench/serve.py --model runs/speedrun/chat_model          # 1, 8, 32 clients, 15 s per row
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(proc: subprocess.Popen, base: str, what: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s")


def start_lmstack(model: str, max_batch: int, scheduling: str, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    proc = subprocess.Popen([lmstack, "serve", model, "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", str(max_queue), "--model-name", "bench", "--scheduling", scheduling],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    _wait(proc, base, "lmstack serve")
    return proc, base


def start_transformers(hf_folder: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = str(Path(sys.executable).with_name("transformers"))
    proc = subprocess.Popen([exe, "serve", hf_folder, "--port", str(port), "--host", "127.0.0.1",
                             "--continuous-batching", "--device", "cpu", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    _wait(proc, base, "transformers serve")
    # transformers serve loads the weights on the first request (lmstack serve loads them before it listens):
    # one untimed request, so the first timed row measures serving, not model loading
    import httpx

    httpx.post(base + "/v1/chat/completions", json={"model": hf_folder, "max_tokens": 1, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=300)
    return proc, base


def bigger_model(chat_model: Path, out: Path) -> Path:
    """A random-weights 28M-parameter decoder with the chat model's tokenizer (and its chat template)."""
    import torch

    from lmstack.model import build_model, preset, save
    from lmstack.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_model)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=512, n_layer=8, n_head=8, n_kv_head=8,
                               max_seq_len=512))
    save(model, out)
    tok.save(out)
    return out


def hf_export(model_dir: Path, out: Path) -> Path:
    """The model as a Hugging Face folder, with lmstack's chat format as its chat template."""
    lmstack = str(Path(sys.executable).with_name("lmstack"))
    subprocess.run([lmstack, "model", "convert", str(model_dir), str(out), "--force"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = ("{{ '<|bos|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + "
                            "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    return out


def run_rows(label: str, base: str, model_name: str | None, concurrency: list[int], args, rows: list[dict],
             ignore_eos: bool = True) -> None:
    from lmstack.serve.loadtest import run_load

    for c in concurrency:   # no warm-up request: the first row includes the cold start
        r = run_load(base, c, args.duration, max_tokens=args.max_tokens, model=model_name, ignore_eos=ignore_eos,
                     range_ratio=args.range_ratio)
        s = r.summary()
        s["mode"] = label
        rows.append(s)
        print(f"{label:34s} c={c:3d} {s['requests']:4d} req {s['output_throughput']:8.1f} tok/s TTFT p50 "
              f"{s['ttft_ms']['median']:.1f} ms failed {s['failed']}", file=sys.stderr, flush=True)


def table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| server | clients | requests | failed | req/s | output tok/s | TTFT mean / p50 / p99 ms "
          "| TPOT mean / p50 / p99 ms | ITL mean / p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|")
    f = lambda d: " / ".join(f"{d[k]:.1f}" for k in ("mean", "median", "p99"))
    for s in rows:
        print(f"| {s['mode']} | {s['concurrency']} | {s['requests']} | {s['failed']} | "
              f"{s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {f(s['ttft_ms'])} | "
              f"{f(s['tpot_ms'])} | {f(s['itl_ms'])} |")
    by = {(s["mode"], s["concurrency"]): s for s in rows}
    lone = by.get(("continuous", 1))
    print()
    for c in sorted({s["concurrency"] for s in rows}):
        a = by.get(("continuous", c))
        if a is None:
            continue
        parts = [f"{c} clients: continuous"]
        for other in ("static", "one-at-a-time", "transformers serve"):
            b = by.get((other, c))
            if b and b["output_throughput"] > 0:
                parts.append(f"{a['output_throughput'] / b['output_throughput']:.2f}x {other}")
        if lone and c > 1:
            parts.append(f"TTFT p50 {a['ttft_ms']['median'] / lone['ttft_ms']['median']:.2f}x a lone request's")
        print("- " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "speedrun" / "chat_model"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--range-ratio", type=float, default=0.5,
                    help="output lengths spread over [1-r, 1+r] x max-tokens (vLLM's --random-range-ratio)")
    ap.add_argument("--models", nargs="+", default=["chat", "28m"], choices=["chat", "28m"])
    ap.add_argument("--modes", nargs="+", default=["continuous", "static", "one-at-a-time", "transformers"],
                    choices=["continuous", "static", "one-at-a-time", "transformers"])
    args = ap.parse_args()
    chat = Path(args.model)
    if not chat.exists():   # `make bench` runs every script: skip, do not fail
        print(f"# bench/serve.py skipped: no model at {chat} (run `lmstack speedrun` first or pass --model)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    top = max(args.concurrency)
    results: dict[str, list[dict]] = {}
    try:
        for which in args.models:
            folder = chat if which == "chat" else bigger_model(chat, tmp / "m28")
            rows: list[dict] = []
            for mode in args.modes:
                if mode == "transformers":
                    try:
                        proc, base = start_transformers(str(hf_export(folder, tmp / f"hf_{which}")))
                    except Exception as e:  # noqa: BLE001  (the peer is optional: say why it is missing)
                        print(f"transformers serve: not run ({type(e).__name__}: {str(e)[-300:]})", file=sys.stderr)
                        continue
                    label, name, ignore = "transformers serve", None, False
                else:
                    max_batch = 1 if mode == "one-at-a-time" else top
                    proc, base = start_lmstack(str(folder), max_batch, "static" if mode == "static" else "continuous",
                                               4 * top)
                    label, name, ignore = mode, "bench", True
                try:
                    run_rows(label, base, name, args.concurrency, args, rows, ignore)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
            results[which] = rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    flags = ""
    try:
        cpu = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0]
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu.split())
    except (OSError, IndexError):
        pass
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({flags}), Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}; {args.duration:.0f} s per row, max_tokens {args.max_tokens} x [1 -/+ "
          f"{args.range_ratio}] (ignore_eos for lmstack), greedy, streaming; servers and clients share the machine.")
    for which, rows in results.items():
        table("speedrun chat model (1.4M parameters)" if which == "chat" else
              "random-weights 28M-parameter model (d_model 512, 8 layers), same tokenizer", rows)


if __name__ == "__main__":
    main()
