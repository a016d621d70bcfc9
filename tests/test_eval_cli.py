"""The `lmstack eval` commands, the learned metric and the speedrun evaluation function."""

from __future__ import annotations

import json

import pytest

from lmstack.errors import DataError


def run_cli(argv):
    import argparse

    from lmstack.eval.cli import register

    parser = argparse.ArgumentParser(prog="lmstack")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_metrics_command_matches_library(tmp_path, capsys):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyp = ["the cat sat on the mat", "a quick brown fox", "hello world"]
    ref = ["the cat is on the mat", "the quick brown fox", "hello there world"]
    other = ["a cat sat on a mat", "quick fox", "hello"]
    (tmp_path / "hyp.txt").write_text("\n".join(hyp), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(other), encoding="utf-8")
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps({"answer": r}) for r in ref), encoding="utf-8")
    out = tmp_path / "scores.json"
    code = run_cli(["eval", "metrics", "--pred", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.jsonl"),
                    "--ref-field", "answer", "--metrics", "bleu,rougeL", "--option", "rougeL.use_stemmer=true",
                    "--ci", "--resamples", "100", "--compare", str(tmp_path / "b.txt"), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["metrics"]["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)
    assert len(data["metrics"]["bleu"]["ci"]) == 2 and "bleu" in data["compare"]
    assert "| bleu |" in capsys.readouterr().out


def test_metrics_command_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("x\n", encoding="utf-8")
    from lmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="1 references but 2 predictions"):
        run_cli(["eval", "metrics", "--pred", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "r.txt")])
    (tmp_path / "p.jsonl").write_text('{"out": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="no field 'prediction'"):
        run_cli(["eval", "metrics", "--pred", str(tmp_path / "p.jsonl"), "--ref", str(tmp_path / "r.txt")])


def test_correlate_command(tmp_path, capsys):
    rows = [{"doc": d, "sys": s, "pred": f"word{d} word{s}", "ref": f"word{d} word1", "human": float(s == 1) + 0.1 * s,
             "score": float(s)} for d in range(4) for s in range(3)]
    path = tmp_path / "ratings.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = tmp_path / "c.json"
    assert run_cli(["eval", "correlate", str(path), "--human", "human", "--scores", "score", "--compute", "rouge1",
                    "--pred-field", "pred", "--ref-field", "ref", "--group-field", "doc", "--json", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    # per document: rouge1 = (0.5, 1, 0.5) -> ranks (1.5, 3, 1.5); human ranks (1, 3, 2): rho = sqrt(3)/2
    assert table["rouge1"]["human"]["spearman"] == pytest.approx(3 ** 0.5 / 2)
    assert table["rouge1"]["human"]["kendall"] == pytest.approx(2 / 6 ** 0.5)   # tau-b: (2 - 0) / sqrt(2 * 3)
    assert table["score"]["human"]["kendall"] == pytest.approx(1 / 3)


def test_train_metric_learns_and_loads(tmp_path):
    from lmstack.eval import compute_metric
    from lmstack.eval.metrics.bertscore import default_encoder_path
    from lmstack.eval.metrics.bleurt import TrainMetricConfig, train_metric
    from lmstack.errors import ConfigError

    import shutil

    from lmstack.model import ModelConfig, build_model, save

    try:
        minilm = default_encoder_path()
    except ConfigError as e:
        pytest.skip(str(e))
    # a tiny random BERT-style encoder with MiniLM's WordPiece tokenizer keeps the test fast
    base = tmp_path / "base"
    save(build_model(ModelConfig(arch="encoder", vocab_size=30522, d_model=32, n_layer=1, n_head=2, d_ff=64,
                                 max_seq_len=64, norm_position="post", embed_norm=True, final_norm=False,
                                 type_vocab_size=2, norm_eps=1e-12)), base)
    shutil.copyfile(minilm / "tokenizer.json", base / "tokenizer.json")
    refs, cands, ratings = [], [], []
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    for i in range(48):
        ref = " ".join(words[(i + j) % len(words)] for j in range(6))
        keep = i % 4
        cand = " ".join(ref.split()[:keep] + ["noise"] * (6 - keep))
        refs.append(ref)
        cands.append(cand)
        ratings.append(float(keep))
    summary = train_metric(refs, cands, ratings, tmp_path / "metric",
                           TrainMetricConfig(base=str(base), epochs=6, lr=2e-3, batch_size=8, max_length=64))
    losses = summary["train_mse_per_epoch"]
    assert losses[-1] < losses[0]
    res = compute_metric("bleurt", cands[:8], refs[:8], checkpoint=str(tmp_path / "metric"))
    from lmstack.eval.correlate import spearman

    assert spearman(res.per_item, ratings[:8]) > 0.5


def test_evaluate_run_for_speedrun():
    import torch

    from lmstack.eval.report import evaluate_run
    from lmstack.model import build_model, preset
    from lmstack.tokenizer import train_bpe

    text = "the cat sat on the mat. the dog ran in the park. " * 10
    tok = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_head=2, max_seq_len=128))
    results, md = evaluate_run(model, tok, ["the cat sat on the mat.", "the dog ran."],
                               prompts=["the cat", "the dog"], references=["sat on the mat.", "ran in the park."],
                               mc_items=[{"query": "the cat sat on the", "choices": ["mat.", "park."], "gold": 0}],
                               max_new_tokens=8)
    assert results["heldout"]["perplexity"] > 1 and results["heldout"]["bits_per_byte"] > 0
    assert set(results["generation"]["metrics"]) >= {"bleu", "chrf", "rougeL"}
    assert results["multiple_choice"]["items"] == 1
    assert md.startswith("### Evaluation") and "bits per byte" in md
    with pytest.raises(DataError, match="2 prompts but 1 references"):
        evaluate_run(model, tok, [], prompts=["a", "b"], references=["c"])
