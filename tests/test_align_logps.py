import torch
import torch.nn.functional as F

from lmstack.align.logps import sequence_logps, token_logps


def test_token_logps_equal_minus_cross_entropy_and_zero_where_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    got = token_logps(logits, labels)
    ref = -F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, ref)
    assert torch.all(got[0, :2] == 0)


def test_sequence_logps_sum_and_mean_over_scored_tokens():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 7)
    x = torch.randint(0, 7, (2, 4))
    y = torch.randint(0, 7, (2, 4))
    y[1, :3] = -100
    per_token = token_logps(emb(x), y)
    torch.testing.assert_close(sequence_logps(emb, x, y), per_token.sum(-1))
    torch.testing.assert_close(sequence_logps(emb, x, y, average=True),
                               torch.stack([per_token[0].sum() / 4, per_token[1].sum() / 1]))
