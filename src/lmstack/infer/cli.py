"""``lmstack generate RUN_DIR --prompt ...`` and ``lmstack chat RUN_DIR``: thin wrappers over lmstack.infer."""

from __future__ import annotations

import argparse
import json
import sys

from lmstack.errors import LmstackError

FIELDS_HELP = ("Any GenerationConfig field can be given as --FIELD VALUE (e.g. --max_new_tokens 64 --do_sample "
               "true --temperature 0.8 --top_p 0.95 --num_beams 4 --seed 0 --stop_strings '[\"\\n\\n\"]').")


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter

    gen = subparsers.add_parser(
        "generate", help="complete prompts with a trained model (greedy, sampling, beam, speculative)",
        description="Generate text from RUN_DIR (an lmstack run or model folder, or a Hugging Face folder, with "
                    "tokenizer.json). " + FIELDS_HELP,
        epilog="examples:\n"
               "  lmstack generate runs/speedrun --prompt 'Once upon a time'\n"
               "  lmstack generate runs/speedrun --prompt 'def add(' --do_sample true --top_p 0.9 --seed 1\n"
               "  lmstack generate runs/speedrun --prompt a --prompt b --num_beams 4 --json\n"
               "  lmstack generate runs/big --prompt 'Hi' --draft runs/small --stream\n"
               "  lmstack generate runs/speedrun --prompt 'x' --config gen.toml --max_new_tokens 200\n"
               "  lmstack generate runs/speedrun --prompt 'JSON:' --json-schema person.schema.json",
        formatter_class=HelpFormatter)
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    _common(gen)
    gen.add_argument("--draft", default=None, metavar="RUN_DIR", help="draft model for speculative decoding")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    gen.add_argument("--json-schema", default=None, metavar="FILE",
                     help="constrain the output to JSON valid under this JSON Schema file (llguidance by default; "
                          "--constraint_backend xgrammar selects the other engine)")
    gen.add_argument("--regex", default=None, metavar="PATTERN", help="constrain the output to match this regex")
    gen.add_argument("--grammar", default=None, metavar="FILE", help="constrain the output to this Lark grammar")
    gen.add_argument("--json", action="store_true",
                     help="print JSON lines: prompt, completion, finish_reason ('stop' | 'length'), new_tokens")
    gen.set_defaults(func=cmd_generate, accepts_overrides=True)

    chat = subparsers.add_parser(
        "chat", help="interactive chat in the terminal (chat template, streaming)",
        description="Chat with RUN_DIR using lmstack's chat template (<|user|> ... <|end|><|assistant|>). Type a "
                    "message and Enter; /reset forgets the conversation, /exit (or Ctrl-D) quits. " + FIELDS_HELP,
        epilog="examples:\n"
               "  lmstack chat runs/speedrun               # a speedrun's fine-tuned chat_model\n"
               "  lmstack chat runs/sft/merged --system 'You are terse.' --do_sample true --temperature 0.7\n"
               "  echo 'Hello' | lmstack chat runs/sft --max_new_tokens 64\n"
               "  lmstack chat --url http://127.0.0.1:8000      # a running lmstack serve (or any OpenAI API)",
        formatter_class=HelpFormatter)
    chat.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--url", default=None,
                      help="chat with a running OpenAI-compatible server (lmstack serve, vLLM, ...) instead of RUN_DIR")
    chat.add_argument("--model-name", default=None, help="with --url: the model to ask (default: the server's first)")
    chat.add_argument("--api-key", default=None, help="with --url: the server's API key (bearer token)")
    _common(chat)
    chat.set_defaults(func=cmd_chat, accepts_overrides=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="GenerationConfig file (JSON/TOML/YAML)")
    p.add_argument("--stop-id", type=int, action="append", default=[], metavar="ID",
                   help="also stop on this token id (repeat; added to the tokenizer's EOS), e.g. --stop-id 1 "
                        "for models that end a text with BOS")
    p.add_argument("--stop-token", action="append", default=[], metavar="TOKEN",
                   help="also stop on this token (a special token such as '<s>'; repeat)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto",
                   help="cast weights: fp32, bf16, fp16; auto (default): as stored, but bf16/fp16 weights run "
                        "in fp32 where the device has no fast bf16/fp16 matmul")


def _setup(args: argparse.Namespace, max_new_default: int, prefer: tuple[str, ...] = ("pretrain", "chat_model")):
    import torch

    from lmstack.infer.config import GenerationConfig
    from lmstack.infer.text import load_run
    from lmstack.runtime import resolve_device, resolve_dtype

    base = {"max_new_tokens": max_new_default}
    from lmstack.config import load_config

    cfg = load_config(GenerationConfig, args.config, getattr(args, "overrides", None), base=base)
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, resolve_device(args.device)).dtype
    model, tok = load_run(args.run_dir, device=args.device, dtype=dtype, prefer=prefer)
    if dtype is None:  # auto: keep what is stored unless it is a dtype this device only emulates
        stored = next(model.parameters()).dtype
        choice = resolve_dtype("auto", next(model.parameters()).device, announce=False)
        if stored != torch.float32 and choice.dtype == torch.float32:
            model, dtype = model.float(), torch.float32
            print(f"[dtype] {stored} weights run in fp32 here: {choice.reason}", file=sys.stderr)
    if args.stop_id or args.stop_token:
        from lmstack.infer.text import stop_ids

        extra = stop_ids(tok, args.stop_id, args.stop_token)
        eos = list(cfg.eos_token_id) if cfg.eos_token_id is not None else (
            [tok.eos_id] if tok.eos_id is not None else [])
        cfg = cfg.replace(eos_token_id=list(dict.fromkeys(eos + extra)))
    return cfg, model, tok, dtype


def _constraint_args(args: argparse.Namespace, cfg):
    """--json-schema FILE / --regex / --grammar FILE into the config (one at most, as the config checks)."""
    from pathlib import Path

    changes = {}
    if args.json_schema is not None:
        path = Path(args.json_schema)
        try:
            changes["json_schema"] = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise LmstackError(f"--json-schema {path}: cannot read it ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LmstackError(f"--json-schema {path}: not a JSON file ({e})") from None
    if args.regex is not None:
        changes["regex"] = args.regex
    if args.grammar is not None:
        path = Path(args.grammar)
        try:
            changes["grammar"] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmstackError(f"--grammar {path}: cannot read it ({e})") from None
    return cfg.replace(**changes) if changes else cfg


def _timing(n_tokens: int, seconds: float, first: float | None = None) -> str:
    """One stderr line: new tokens, wall time, tokens/s, and time to first token when streamed."""
    rate = n_tokens / seconds if seconds > 0 else float("inf")
    ttft = f", first token {first * 1000:.0f} ms" if first is not None else ""
    return f"[generate] {n_tokens} new tokens in {seconds:.2f}s ({rate:.1f} tokens/s{ttft})"


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from lmstack.infer.text import complete_batch, load_run, stream_complete

    if args.stream and args.json:
        raise LmstackError("--stream prints text as it comes and --json prints records: choose one")
    cfg, model, tok, dtype = _setup(args, 64)
    cfg = _constraint_args(args, cfg)
    draft = load_run(args.draft, device=args.device, dtype=dtype)[0] if args.draft else None
    if args.stream:
        if len(args.prompt) != 1:
            raise LmstackError("--stream takes one --prompt")
        sys.stdout.write(args.prompt[0])
        t0, first, parts = time.perf_counter(), None, []
        for delta in stream_complete(model, tok, args.prompt[0], cfg, draft_model=draft):
            first = time.perf_counter() - t0 if first is None else first
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        # The stream yields text, not ids: the printed text's token count (stop tokens are not printed).
        print(_timing(len(tok.encode("".join(parts))), time.perf_counter() - t0, first), file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    done = complete_batch(model, tok, list(args.prompt), cfg, draft_model=draft)
    seconds = time.perf_counter() - t0
    n = len(done) // len(args.prompt)
    for i, c in enumerate(done):
        prompt = args.prompt[i // n]
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": c.text, "finish_reason": c.finish_reason,
                              "new_tokens": c.n_tokens}, ensure_ascii=False))
        else:
            print(prompt + c.text)
            if i + 1 < len(done):
                print("-" * 40)
    sys.stdout.flush()
    print(_timing(sum(c.n_tokens for c in done), seconds), file=sys.stderr)
    return 0


def _remote_chat(args: argparse.Namespace):
    """(cfg, reply function, fit function) for ``--url``: the server renders and fits; its errors are reported."""
    from lmstack.config import load_config
    from lmstack.infer.config import GenerationConfig
    from lmstack.serve.client import list_models, stream_chat

    cfg = load_config(GenerationConfig, args.config, getattr(args, "overrides", None), base={"max_new_tokens": 256})
    model = args.model_name or list_models(args.url, args.api_key)[0]   # fails now if the server is unreachable
    params = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature if cfg.do_sample else 0.0,
              "top_p": cfg.top_p}
    if cfg.seed is not None:
        params["seed"] = cfg.seed
    if cfg.stop_strings:
        params["stop"] = cfg.stop_strings[:4]
    return (lambda history: stream_chat(args.url, history, params, model, args.api_key)), \
        (lambda trial: (trial, 0))


def cmd_chat(args: argparse.Namespace) -> int:
    from lmstack.errors import LmstackError

    if (args.url is None) == (args.run_dir is None):
        raise LmstackError("lmstack chat: give RUN_DIR or --url URL (one of them)")
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.url is not None:
        reply_to, fit = _remote_chat(args)
        context_note = "the server refused the message"
    else:
        from lmstack.infer.text import chat_prompt_ids, chat_stream, prompt_budget

        cfg, model, tok, _ = _setup(args, 256, prefer=("chat_model", "pretrain"))
        budget = prompt_budget(model, cfg)   # the context rule complete() applies, checked before the first turn
        reply_to = lambda history: chat_stream(model, tok, history, cfg)
        fit = lambda trial: _fit(tok, trial, len(base), budget, chat_prompt_ids)
        context_note = (f"this message does not fit the model's context ({model.config.max_seq_len} tokens, "
                        f"{cfg.max_new_tokens} kept for the reply)")
    return _chat_loop(base, reply_to, fit, context_note)


def _chat_loop(base, reply_to, fit, context_note: str) -> int:
    from lmstack.errors import LmstackError

    history = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print("lmstack chat: /reset forgets the conversation, /exit or Ctrl-D quits; Ctrl-C stops a reply.",
              file=sys.stderr)
    interrupted = False
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            if interrupted:  # a second Ctrl-C in a row at the prompt quits
                print(file=sys.stderr)
                break
            interrupted = True
            print("\n(Ctrl-C again or Ctrl-D to quit)", file=sys.stderr)
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            continue
        trial = history + [{"role": "user", "content": line}]
        fitted, dropped = fit(trial)
        if fitted is None:
            print(f"error: {context_note}; it was not sent, the conversation is kept", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the context)", file=sys.stderr)
        sys.stdout.write("assistant> " if interactive else "")
        reply = []
        try:
            for delta in reply_to(fitted):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session and what was said so far
            sys.stdout.write(" [stopped]")
        except LmstackError as e:  # a server's refusal (e.g. context length): report it, keep the session
            sys.stdout.write("\n")
            print(f"error: {e}; the message was not kept", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history = fitted + [{"role": "assistant", "content": "".join(reply)}]
    return 0


def _fit(tok, history: list[dict[str, str]], keep: int, budget: int | None, prompt_ids
         ) -> tuple[list[dict[str, str]] | None, int]:
    """Drop the oldest turns (after the ``keep`` system messages) until the prompt fits ``budget`` tokens
    (None: no limit), whole messages rather than complete()'s cut inside one. Returns (history, number
    dropped), or (None, 0) when the last message alone does not fit."""
    history = list(history)
    dropped = 0
    while budget is not None and len(prompt_ids(tok, history)) > budget:
        if len(history) <= keep + 1:
            return None, 0
        del history[keep]
        dropped += 1
    return history, dropped
