"""``lmstack model info | convert`` through the subcommand group's own parser (the handlers the CLI calls)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.model import build_model, hf, load, save
from lmstack.model import cli as model_cli
from lmstack.model.config import ModelConfig


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmstack")
    model_cli.register(parser.add_subparsers(dest="command"))
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    return args.func(args)


def test_info_preset_json_with_overrides(capsys):
    assert run(["model", "info", "gpt2-124m", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["parameters"] == 124_439_808 and facts["weights_bf16_bytes"] == 2 * 124_439_808
    assert run(["model", "info", "tiny", "--n_layer", "8", "--d_model", "256", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["layers"] == 8 and facts["head_dim"] == 64          # derived fields follow the override
    with pytest.raises(ConfigError, match="n_layr"):
        run(["model", "info", "tiny", "--n_layr", "8"])
    with pytest.raises(ConfigError, match="neither a preset"):
        run(["model", "info", "no-such-model"])


def test_convert_round_trip(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, n_kv_head=2, pos="rope", norm="rmsnorm",
                      ffn="swiglu", activation="silu", bias=False, max_seq_len=32)
    model = build_model(cfg).eval()
    save(model, tmp_path / "ours")
    assert run(["model", "convert", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert run(["model", "convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype", "bf16"]) == 0
    back = load(tmp_path / "back")
    assert back.embed.tok.weight.dtype == torch.bfloat16
    x = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(back.float()(x), model(x), atol=0.05, rtol=0)
    assert isinstance(hf.load(tmp_path / "hf"), torch.nn.Module)
    assert "Hugging Face -> lmstack" in capsys.readouterr().out
