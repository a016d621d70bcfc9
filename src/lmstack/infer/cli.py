"""``lmstack generate RUN_DIR --prompt ...`` and ``lmstack chat RUN_DIR``: thin wrappers over lmstack.infer."""

from __future__ import annotations

import argparse
import json
import sys

from lmstack.errors import LmstackError

FIELDS_HELP = ("Any GenerationConfig field can be given as --FIELD VALUE (e.g. --max_new_tokens 64 --do_sample "
               "true --temperature 0.8 --top_p 0.95 --num_beams 4 --seed 0 --stop_strings '[\"\\n\\n\"]').")


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.cli import HelpFormatter

    gen = subparsers.add_parser(
        "generate", help="complete prompts with a trained model (greedy, sampling, beam, speculative)",
        description="Generate text from RUN_DIR (an lmstack run or model folder, or a Hugging Face folder, with "
                    "tokenizer.json). " + FIELDS_HELP,
        epilog="examples:\n"
               "  lmstack generate runs/speedrun --prompt 'Once upon a time'\n"
               "  lmstack generate runs/speedrun --prompt 'def add(' --do_sample true --top_p 0.9 --seed 1\n"
               "  lmstack generate runs/speedrun --prompt a --prompt b --num_beams 4 --json\n"
               "  lmstack generate runs/big --prompt 'Hi' --draft runs/small --stream\n"
               "  lmstack generate runs/speedrun --prompt 'x' --config gen.toml --max_new_tokens 200",
        formatter_class=HelpFormatter)
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    _common(gen)
    gen.add_argument("--draft", default=None, metavar="RUN_DIR", help="draft model for speculative decoding")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    gen.add_argument("--json", action="store_true", help="print JSON lines: prompt, completion")
    gen.set_defaults(func=cmd_generate, accepts_overrides=True)

    chat = subparsers.add_parser(
        "chat", help="interactive chat in the terminal (chat template, streaming)",
        description="Chat with RUN_DIR using lmstack's chat template (<|user|> ... <|end|><|assistant|>). Type a "
                    "message and Enter; /reset forgets the conversation, /exit (or Ctrl-D) quits. " + FIELDS_HELP,
        epilog="examples:\n"
               "  lmstack chat runs/speedrun               # a speedrun's fine-tuned chat_model\n"
               "  lmstack chat runs/sft/merged --system 'You are terse.' --do_sample true --temperature 0.7\n"
               "  echo 'Hello' | lmstack chat runs/sft --max_new_tokens 64",
        formatter_class=HelpFormatter)
    chat.add_argument("run_dir", metavar="RUN_DIR")
    chat.add_argument("--system", default=None, help="system message")
    _common(chat)
    chat.set_defaults(func=cmd_chat, accepts_overrides=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="GenerationConfig file (JSON/TOML/YAML)")
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
    return cfg, model, tok, dtype


def cmd_generate(args: argparse.Namespace) -> int:
    from lmstack.infer.text import generate_text, load_run, stream_text

    cfg, model, tok, dtype = _setup(args, 64)
    draft = load_run(args.draft, device=args.device, dtype=dtype)[0] if args.draft else None
    if args.stream:
        if len(args.prompt) != 1:
            raise LmstackError("--stream takes one --prompt")
        sys.stdout.write(args.prompt[0])
        for delta in stream_text(model, tok, args.prompt[0], cfg, draft_model=draft):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    texts = generate_text(model, tok, list(args.prompt), cfg, draft_model=draft)
    n = len(texts) // len(args.prompt)
    for i, text in enumerate(texts):
        prompt = args.prompt[i // n]
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
        else:
            print(prompt + text)
            if i + 1 < len(texts):
                print("-" * 40)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmstack.infer.text import chat_stream

    cfg, model, tok, _ = _setup(args, 256, prefer=("chat_model", "pretrain"))
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    if interactive:
        print("lmstack chat: /reset forgets the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        history = _fit(tok, history, len(base), model.config.max_seq_len - cfg.max_new_tokens)
        sys.stdout.write("assistant> " if interactive else "")
        reply = []
        for delta in chat_stream(model, tok, history, cfg):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _fit(tok, history: list[dict[str, str]], keep: int, budget: int) -> list[dict[str, str]]:
    """Drop the oldest turns (after the ``keep`` system messages) until the prompt fits ``budget`` tokens."""
    from lmstack.tokenizer.chat import render_chat

    while len(history) > keep + 1 and len(render_chat(tok, history, add_generation_prompt=True)[0]) > budget:
        del history[keep]
    return history
