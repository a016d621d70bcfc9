"""Pruning: exact mask sparsities and N:M patterns, Wanda's activation norms, structured pruning that equals the
masked original model, pruned configs that save / load / export / generate, and one-line errors."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

import lmstack.model as lm
from lmstack.compress.calib import text_batches
from lmstack.compress.prune import (cubic_sparsity, input_norms, nm_mask, prunable_linears, prune_unstructured,
                                    sparsity_report, unstructured_masks)
from lmstack.compress.prune_structured import (StructuredPlan, apply_plan, plan_structured, prune_structured,
                                               unit_scores, zero_pruned)
from lmstack.errors import ConfigError, DataError
from lmstack.model import build_model, hf, preset

VOCAB = 97


def _cfg(**kw):
    # GQA (4 query heads in 2 KV groups), SwiGLU, RoPE, 4 layers; small enough for float64
    return preset("tiny", **{**dict(vocab_size=VOCAB, d_model=64, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=64),
                             **kw})


GPT2_LIKE = dict(pos="learned", norm="layernorm", ffn="mlp", activation="gelu", bias=True, n_kv_head=None)


def _model(**kw):
    torch.manual_seed(0)
    model = build_model(_cfg(**kw)).double().eval()
    with torch.no_grad():                    # init leaves norms at 1 and biases at 0: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(b=2, t=12, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_per_layer_masks_have_exactly_the_requested_sparsity(sparsity):
    model = _model()
    prune_unstructured(model, sparsity, "magnitude")
    report = sparsity_report(model)
    for name, lin in prunable_linears(model):
        assert report[name] == int(sparsity * lin.weight.numel() + 0.5) / lin.weight.numel()
    w = model.blocks[0].attn.qkv.weight
    orig = _model().blocks[0].attn.qkv.weight.abs()
    assert orig[w == 0].max() <= orig[w != 0].min()            # the zeros are the smallest magnitudes
    assert "lm_head" not in " ".join(report) and report["total"] == pytest.approx(sparsity, abs=1e-3)


def test_global_scope_uses_one_threshold_over_all_layers():
    model = _model()
    ref = {n: lin.weight.detach().abs().clone() for n, lin in prunable_linears(model)}
    masks = unstructured_masks(model, 0.5, "magnitude", scope="global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == total // 2
    dropped = torch.cat([ref[n][~m] for n, m in masks.items()])
    kept = torch.cat([ref[n][m] for n, m in masks.items()])
    assert dropped.max() <= kept.min()
    per_layer = [float((~m).float().mean()) for m in masks.values()]
    assert max(per_layer) - min(per_layer) > 0.01          # layers differ, unlike scope="layer"


def test_wanda_prunes_the_same_count_in_every_output_row():
    model = _model()
    masks = unstructured_masks(model, 0.5, "wanda", batches=[_ids()])
    for name, m in masks.items():
        assert ((~m).sum(dim=1) == m.shape[1] // 2).all(), name


def test_two_four_masks_keep_the_two_largest_of_every_four():
    model = _model()
    ref = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model)}
    prune_unstructured(model, method="magnitude", pattern="2:4")
    for name, lin in prunable_linears(model):
        groups = lin.weight.view(lin.weight.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()
        orig = ref[name].abs().view_as(groups)
        kept_min = orig.masked_fill(groups == 0, math.inf).amin(-1)
        dropped_max = orig.masked_fill(groups != 0, -math.inf).amax(-1)
        assert (dropped_max <= kept_min).all()
    assert sparsity_report(model)["total"] == 0.5
    assert nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]]), 2, 4).tolist() == \
        [[True, False, True, False, False, True, True, False]]


def test_wanda_chooses_by_weight_times_input_norm_where_magnitude_does_not():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    model = nn.Sequential(lin)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 10.0, 1.0, 1.0])
    norms = input_norms(model, ["0"], [x[:32], x[32:]])
    torch.testing.assert_close(norms["0"], x.norm(dim=0))
    mag = unstructured_masks(model, 0.5, "magnitude", skip=())["0"]
    wanda = unstructured_masks(model, 0.5, "wanda", batches=[x], skip=())["0"]
    assert mag.tolist() == [[False, False, True, True]]
    assert wanda.tolist() == [[True, True, False, False]]


def test_wanda_norms_are_those_of_the_layer_inputs_of_a_decoder():
    model = _model()
    ids = _ids()
    norms = input_norms(model, ["blocks.0.attn.qkv"], [ids])
    pos = torch.arange(ids.shape[1])[None]
    x = model.blocks[0].norm_attn(model.embed(ids, pos))        # what the first qkv sees
    torch.testing.assert_close(norms["blocks.0.attn.qkv"].double(), x.reshape(-1, 64).norm(dim=0),
                               rtol=1e-6, atol=1e-6)


def test_cubic_schedule_of_zhu_and_gupta():
    assert cubic_sparsity(0, 0.8, 100) == 0.0
    assert cubic_sparsity(100, 0.8, 100) == pytest.approx(0.8)
    assert cubic_sparsity(50, 0.8, 100, initial=0.1) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5 ** 3)
    assert cubic_sparsity(5, 0.8, 100, start=10) == 0.0 and cubic_sparsity(500, 0.8, 100) == pytest.approx(0.8)
    values = [cubic_sparsity(t, 0.9, 10) for t in range(11)]
    assert values == sorted(values)


# ---------------------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize("kw", [{}, GPT2_LIKE], ids=["llama-like", "gpt2-like"])
@pytest.mark.parametrize("gqa", ["group", "query"])
@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_structured_model_equals_the_original_with_the_pruned_units_zeroed(kw, gqa, score):
    model = _model(**kw)
    ids = _ids()
    plan = plan_structured(model, heads=0.5, neurons=0.25, score=score, batches=[ids], gqa=gqa)
    small = apply_plan(model, plan)
    twin = copy.deepcopy(model)
    zero_pruned(twin, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(ids), twin(ids), rtol=0, atol=1e-12)
    cfg = small.config
    assert (cfg.n_head, cfg.d_ff, cfg.head_dim, cfg.d_model) == (2, 72, 16, 64)
    assert cfg.n_kv_head == ((1 if gqa == "group" else 2) if not kw else 2)


def test_structured_pruning_of_a_post_norm_encoder_equals_the_zeroed_original():
    cfg = lm.ModelConfig(arch="encoder", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, norm_position="post",
                         embed_norm=True, final_norm=False, max_seq_len=32, mlm_head=True)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    ids = _ids()
    plan = plan_structured(model, heads=0.5, neurons=0.5, score="activation", batches=[ids])
    twin = copy.deepcopy(model)
    zero_pruned(twin, plan)
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(model, plan)(ids), twin(ids), rtol=0, atol=1e-12)


def test_pruning_one_neuron_is_zeroing_its_down_column_and_one_head_its_o_slice():
    model = _model(**GPT2_LIKE)                   # MHA: a head is its own KV group
    ids = _ids()
    n = model.config.n_layer
    plan = StructuredPlan(layers=list(range(n)), heads={i: [0, 1, 3] for i in range(n)},
                          kv_heads={i: [0, 1, 3] for i in range(n)},
                          neurons={i: [j for j in range(96) if j != 5] for i in range(n)})
    small = apply_plan(model, plan)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for b in twin.blocks:
            b.ffn.down.weight[:, 5] = 0
            b.attn.o.weight[:, 2 * 16:3 * 16] = 0
        torch.testing.assert_close(small(ids), twin(ids), rtol=0, atol=1e-12)


def test_dropping_a_block_equals_zeroing_its_residual_branches():
    model = _model(**GPT2_LIKE)
    ids = _ids()
    small, plan = prune_structured(model, layers=2, score="activation", batches=[ids])
    dropped = sorted(set(range(4)) - set(plan.layers))
    assert len(dropped) == 2 and small.config.n_layer == 2
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for i in dropped:                         # pre-norm: a block with zero branches is the identity
            for lin in (twin.blocks[i].attn.o, twin.blocks[i].ffn.down):
                lin.weight.zero_()
                lin.bias.zero_()
        torch.testing.assert_close(small(ids), twin(ids), rtol=0, atol=1e-12)


def test_layer_scores_rank_a_do_nothing_block_last():
    model = _model()
    with torch.no_grad():
        model.blocks[2].attn.o.weight.zero_()
        model.blocks[2].ffn.down.weight.zero_()
    for score in ("magnitude", "activation"):
        _, plan = prune_structured(model, layers=1, score=score, batches=[_ids()])
        assert plan.layers == [0, 1, 3], score
    s = unit_scores(model, "activation", [_ids()])
    assert float(s["layers"][2]) == pytest.approx(0.0, abs=1e-12)


def test_parameter_count_goes_down_by_the_removed_units():
    model = _model()
    before = model.num_parameters()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    small, _ = prune_structured(model, heads=0.5, neurons=0.25, layers=1)    # 1 of 2 KV groups, 24 of 96 neurons
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())      # the input is untouched
    mine = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in mine for p in small.parameters())                   # and shares no storage
    c, d, n_layer = 64, 16, 3
    per_block = 2 * (2 * d * c) + 2 * (1 * d * c) + 3 * 24 * c                # q rows + o cols, k + v, SwiGLU
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert small.num_parameters() == before - block - n_layer * per_block
    with torch.device("meta"):
        assert build_model(small.config).num_parameters() == small.num_parameters()


def test_pruned_model_saves_reloads_and_generates(tmp_path):
    from lmstack.infer import GenerationConfig, generate

    model = _model()
    small, _ = prune_structured(model.float(), heads=0.5, neurons=0.25, layers=1, gqa="query")
    lm.save(small, tmp_path / "m")
    again = lm.load(tmp_path / "m").eval()
    assert again.config == small.config and again.config.n_head * again.config.head_dim != again.config.d_model
    prompt = _ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(again(prompt), small(prompt), rtol=0, atol=0)
        out = generate(again, prompt, GenerationConfig(max_new_tokens=6))
        ids = prompt
        for _ in range(6):                        # greedy without a KV cache: the cached decode must agree
            ids = torch.cat([ids, again(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_pruned_llama_exports_to_hugging_face_and_transformers_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model().float()
    small, _ = prune_structured(model, heads=0.5, neurons=0.25, layers=1)
    hf.save(small, tmp_path / "hf")
    ids = _ids()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, small(ids), rtol=0, atol=1e-4)
        torch.testing.assert_close(hf.load(tmp_path / "hf")(ids), small(ids), rtol=0, atol=0)


def test_head_pruned_gpt2_cannot_be_exported_silently(tmp_path):
    small, _ = prune_structured(_model(**GPT2_LIKE).float(), heads=0.25)
    assert small.config.n_head == 3
    with pytest.raises(ConfigError, match="model config field 'head_dim'=16 cannot be exported"):
        hf.save(small, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=5), r"heads=5 is more than the model has \(4\)"),
    (dict(heads=0.8), r"would remove all 2 KV groups; at least one KV group"),
    (dict(heads=4, gqa="query"), r"would remove all 2 query heads of each KV group"),
    (dict(heads=1), r"heads=1 must be a multiple of 2 with gqa='group'"),
    (dict(heads=1.0), r"heads must be a fraction in \[0, 1\) \(got 1.0\)"),
    (dict(neurons=-0.1), r"neurons must be a fraction in \[0, 1\) \(got -0.1\)"),
    (dict(layers=4), r"layers=4 drops more layers than the model has \(n_layer=4\)"),
    (dict(heads=0.5, score="activation"), r"score 'activation' needs calibration data"),
    (dict(heads=0.5, score="activation", batches=[]), r"prune: the calibration data is empty"),
])
def test_bad_structured_requests_are_one_line_errors(kwargs, message):
    with pytest.raises((ConfigError, DataError), match=message) as e:
        prune_structured(_model(), **kwargs)
    assert "\n" not in str(e.value)


def test_bad_unstructured_requests_are_one_line_errors():
    model = _model()
    with pytest.raises(ConfigError, match=r"sparsity must be a fraction in \[0, 1\) \(got 1.0\)"):
        prune_unstructured(model, 1.0)
    with pytest.raises(ConfigError, match="pattern must look like N:M"):
        prune_unstructured(model, pattern="2-4")
    with pytest.raises(ConfigError, match="method wanda needs calibration data"):
        prune_unstructured(model, 0.5, "wanda")
    with pytest.raises(DataError, match="calibration data is empty"):
        prune_unstructured(model, 0.5, "wanda", batches=iter([]))
    assert sparsity_report(model)["total"] == 0.0                        # nothing was touched


def test_empty_calibration_file_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="the calibration text is empty"):
        text_batches(object(), [tmp_path / "empty.txt"])


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(argv):
    from lmstack.compress.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_prunes_an_lmstack_folder_and_reports(tmp_path, capsys):
    lm.save(_model().float(), tmp_path / "m")
    assert _cli(["compress", "prune", str(tmp_path / "m"), "--heads", "0.5", "--neurons", "24", "--layers", "1",
                 "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "-> " in out and "layers 3, heads 2 (kv 1), d_ff 72" in out
    again = lm.load(tmp_path / "p")
    assert (again.config.n_layer, again.config.n_head, again.config.d_ff) == (3, 2, 72)
    assert _cli(["compress", "prune", str(tmp_path / "m"), "--pattern", "2:4", "--out", str(tmp_path / "s")]) == 0
    assert sparsity_report(lm.load(tmp_path / "s"))["total"] == 0.5
    report = json.loads((tmp_path / "s" / "prune_report.json").read_text())
    assert report["sparsity"] == 0.5 and set(report["sparsity_per_layer"].values()) == {0.5}
    with pytest.raises(ConfigError, match="nothing to do"):
        _cli(["compress", "prune", str(tmp_path / "m"), "--out", str(tmp_path / "x")])


def test_cli_activation_pruning_of_the_real_stories_model(shared_data, tmp_path):
    src = shared_data / "models" / "stories260K"
    text = shared_data / "text" / "tinystories" / "tinystories_valid_sample.txt"
    if not src.is_dir() or not text.is_file():
        pytest.skip("stories260K or the tinystories text is absent")
    assert _cli(["compress", "prune", str(src), "--heads", "0.25", "--neurons", "0.25", "--score", "activation",
                 "--calib", str(text), "--calib-seqs", "4", "--seq-len", "64", "--out", str(tmp_path / "p")]) == 0
    pruned = hf.load(tmp_path / "p")                      # same format as the input: a Hugging Face folder
    cfg = pruned.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.n_layer) == (6, 3, 8, 129, 5)
    assert (tmp_path / "p" / "tokenizer.json").is_file()
    assert pruned.num_parameters() < hf.load(src).num_parameters()
