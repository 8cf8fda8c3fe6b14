"""The statistics head (LDA / NCM): its math against Avalanche's own StreamingLDA, its exact batch merge, its
use as a module's eval-mode output, and the methods built on it (slda, ncm, head_replay, CsKO + LDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_cskl.core.head import UNSEEN_CLASS_SCORE, StatisticsHead


def _clusters(n: int = 120, features: int = 6, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 3
    mix = torch.randn(features, features, generator=g)  # drawn before anything whose size depends on n
    labels = torch.randint(classes, (n,), generator=g)
    return centers[labels] + torch.randn(n, features, generator=g) @ mix, labels


def test_lda_predicts_as_avalanches_streaming_lda():
    # Avalanche's per-sample update weighs each within-class term with the global count and starts every class
    # mean at zero, an approximation of the pooled within-class covariance that ours computes exactly; the class
    # means agree exactly, and so do most predictions, ours being at least as accurate
    from avalanche.training import StreamingLDA

    z, y = _clusters(n=2000)
    theirs = StreamingLDA(slda_model=nn.Identity(), criterion=nn.CrossEntropyLoss(), input_size=6, num_classes=4,
                          shrinkage_param=1e-4, evaluator=None)
    for zi, yi in zip(z, y):  # their per-sample streaming update
        theirs.fit(zi[None], yi[None])
    ours = StatisticsHead("lda", shrinkage=1e-4)
    ours.update(z[:500], y[:500])
    ours.update(z[500:], y[500:])
    assert torch.allclose(ours.means.float(), theirs.muK, atol=1e-4)
    test, truth = _clusters(n=1000, seed=0)  # the same classes, other samples
    mine, avalanche = ours.logits(test).argmax(1), theirs.predict(test).argmax(1)
    assert (mine == avalanche).float().mean() >= 0.9
    assert (mine == truth).float().mean() >= (avalanche == truth).float().mean() - 0.01
    # and ours is the textbook formula on the pooled statistics
    precision = torch.linalg.inv((1 - 1e-4) * ours.covariance() + 1e-4 * torch.eye(6, dtype=torch.float64))
    direct = test.double() @ precision @ ours.means.T - 0.5 * ((ours.means @ precision) * ours.means).sum(1)
    assert torch.allclose(ours.logits(test).double(), direct, rtol=1e-4, atol=1e-3)


def test_batches_merge_exactly_whatever_their_split():
    z, y = _clusters(features=5)
    whole, pieces = StatisticsHead(), StatisticsHead()
    whole.update(z, y)
    for start in range(0, len(y), 7):
        pieces.update(z[start:start + 7], y[start:start + 7])
    assert torch.equal(whole.classes, pieces.classes)
    assert torch.allclose(whole.means, pieces.means) and torch.allclose(whole.scatter, pieces.scatter)
    pooled = sum(((z[y == c] - z[y == c].mean(0)).T @ (z[y == c] - z[y == c].mean(0)) for c in y.unique()))
    assert torch.allclose(whole.covariance(), pooled.double() / len(y), atol=1e-5)


def test_qda_class_scatter_is_each_class_own_whatever_the_batches():
    z, y = _clusters(n=200, features=5)
    whole, pieces = StatisticsHead("qda"), StatisticsHead("qda")
    whole.update(z, y)
    for start in range(0, len(y), 9):  # batches that miss some classes
        pieces.update(z[start:start + 9], y[start:start + 9])
    for head in (whole, pieces):
        for i, c in enumerate(head.classes.tolist()):
            zc = z[y == c].double()
            own = (zc - zc.mean(0)).T @ (zc - zc.mean(0))
            assert torch.allclose(head.class_scatter[i], own, atol=1e-6), c


def test_ncm_is_the_nearest_mean_and_unseen_classes_never_win():
    head = StatisticsHead("ncm")
    head.update(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([1, 3]))
    scores = head.logits(torch.tensor([[9.0, 1.0], [1.0, -1.0]]), num_classes=5)
    assert scores.argmax(1).tolist() == [3, 1]
    assert (scores[:, [0, 2, 4]] == UNSEEN_CLASS_SCORE).all()


def test_bad_input_is_refused_and_nothing_is_stored():
    with pytest.raises(ValueError, match="statistics_head='svm' is not allowed: use one of 'lda', 'ncm', 'qda'"):
        StatisticsHead("svm")
    with pytest.raises(ValueError, match="shrinkage=2 is not allowed"):
        StatisticsHead("lda", shrinkage=2)
    head = StatisticsHead()
    with pytest.raises(RuntimeError, match="has seen no data yet"):
        head.logits(torch.zeros(1, 3))
    head.update(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))  # left out, never stored
    assert len(head) == 0
    head.update(torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="features have size 2, the statistics were built with 3"):
        head.update(torch.ones(2, 2), torch.tensor([0, 1]))


def test_attached_head_answers_in_eval_mode_only_and_state_round_trips():
    z, y = _clusters()
    stats = StatisticsHead()
    stats.update(z, y)
    linear = nn.Linear(6, 4)
    handle = stats.attach(linear)
    trained = linear.train()(z)
    assert torch.equal(trained, nn.functional.linear(z, linear.weight, linear.bias))
    evaluated = linear.eval()(z)
    assert torch.allclose(evaluated, stats.logits(z))
    assert (evaluated.argmax(1) == y).float().mean() > 0.9
    handle.remove()
    assert not torch.allclose(linear(z), evaluated)
    copy = StatisticsHead()
    copy.load_state_dict(torch.load(_saved(stats.state_dict()), weights_only=True))
    assert torch.equal(copy.logits(z), stats.logits(z))


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
