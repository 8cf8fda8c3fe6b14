"""Domain-incremental and cross-dataset benchmarks (lightning_cskl.data.shifts): each input condition's defining
property, disjoint class-stratified training shares, test experiences that are the test images under each domain,
Fashion-MNIST + digits as classes 10-19, and one real CsKO + DCES run over the digit domains."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from lightning_cskl.avalanche import ClassIncrementalNet, run_continual
from lightning_cskl.experiments.baselines import build_method
from lightning_cskl.data import (
    DEBIAN_FASHION_MNIST,
    DOMAINS,
    domain_benchmark,
    fashion_digits_benchmark,
    fashion_mnist_domains,
    prepare_fashion_mnist,
    shift_images,
    split_digits,
    split_digits_domains,
)
from lightning_cskl.data.shifts import _TEST, _generator
from lightning_cskl.models import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


@pytest.fixture(scope="module")
def digits():
    """Split Digits as one task: ``((train_x, train_y), (test_x, test_y))``."""
    (data,) = split_digits(n_tasks=1, seed=0)
    return tuple(data.train.tensors[:2]), tuple(data.test.tensors[:2])


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install -y dataset-fashion-mnist provides Fashion-MNIST offline")
    return prepare_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def _images(n=5, c=3, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- transforms
def test_clean_is_an_unchanged_copy_and_inputs_are_never_changed():
    x = _images()
    before = x.clone()
    clean = shift_images(x, "clean")
    assert torch.equal(clean, x) and clean.data_ptr() != x.data_ptr()
    for domain in DOMAINS:
        out = shift_images(x, domain, _gen(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(x, before)


def test_invert_twice_is_the_identity():
    x = _images()
    once = shift_images(x, "invert")
    assert torch.allclose(once, 1.0 - x) and not torch.allclose(once, x)
    assert torch.allclose(shift_images(once, "invert"), x, atol=1e-6)


def test_rotate_four_times_is_the_identity_and_needs_square_images():
    x = _images()
    out = x
    for turn in range(4):
        out = shift_images(out, "rotate")
        assert torch.equal(out, torch.rot90(x, turn + 1, dims=(-2, -1)))
        assert turn == 3 or not torch.equal(out, x)
    assert torch.equal(out, x)  # exact, not approximately
    with pytest.raises(ValueError, match=r"domain='rotate' needs square images: these are 8×6 \(H×W\)"):
        shift_images(_images(w=6), "rotate")


def test_noise_is_reproducible_with_the_same_seed_and_differs_with_another():
    x = torch.full((64, 1, 8, 8), 0.5)
    a, b = shift_images(x, "noise", _gen(1)), shift_images(x, "noise", _gen(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, shift_images(x, "noise", _gen(2)))
    assert not torch.equal(a[0], a[1])  # every sample draws its own noise
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0  # clamped
    assert abs(float((a - x).std()) - 0.5) < 0.15  # std 0.5 (shrunk a little by the clamp)


def test_occlusion_zeroes_exactly_one_half_side_square_per_sample():
    n, c, h = 50, 3, 10
    x = torch.ones(n, c, h, h)
    out = shift_images(x, "occlude", _gen(0))
    side = h // 2
    corners = set()
    for sample in out:
        zero = sample == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # every channel, same square
        assert int(zero[0].sum()) == side * side
        rows, cols = zero[0].nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        assert int(rows.max()) - top == side - 1 and int(cols.max()) - left == side - 1  # a square, in bounds
        corners.add((top, left))
    assert len(corners) > 5  # random positions per sample
    assert torch.equal(out, shift_images(x, "occlude", _gen(0)))
    assert not torch.equal(out, shift_images(x, "occlude", _gen(1)))


def test_blur_preserves_a_constant_image_and_smooths_an_edge():
    x = torch.full((2, 3, 8, 8), 0.3)
    out = shift_images(x, "blur")
    assert torch.allclose(out.mean(), x.mean(), atol=1e-6) and torch.allclose(out, x, atol=1e-6)
    edge = torch.zeros(1, 1, 16, 16)
    edge[..., 8:] = 1.0
    blurred = shift_images(edge, "blur")
    assert 0.0 < float(blurred[0, 0, 0, 7]) < 0.5 < float(blurred[0, 0, 0, 8]) < 1.0
    assert torch.allclose(blurred[0, 0, :, 7] + blurred[0, 0, :, 8], torch.ones(16), atol=1e-6)  # symmetric


def test_unknown_domain_is_refused_with_the_allowed_list(digits):
    allowed = "clean, invert, rotate, blur, noise, occlude"
    with pytest.raises(ValueError, match=re.escape(f"domain='fog' is not allowed: use one of {allowed}")):
        shift_images(_images(), "fog")
    with pytest.raises(ValueError, match=re.escape(f"domain='fog' is not allowed: use one of {allowed}")):
        domain_benchmark(*digits, domains=("clean", "fog"))
    with pytest.raises(ValueError, match=r"images of shape \(8, 8\) are not allowed"):
        shift_images(torch.rand(8, 8), "clean")
    with pytest.raises(ValueError, match=r"domain='blur' needs images over 3×3 \(reflect padding\): these are 3×8"):
        shift_images(torch.rand(1, 1, 3, 8), "blur")


# ---------------------------------------------------------------------------------------------- domain-incremental
def test_domain_benchmark_streams_hold_every_class_with_task_label_zero(digits):
    bm = split_digits_domains()
    assert len(bm.train_stream) == len(bm.test_stream) == 4
    assert bm.domains == ("clean", "invert", "rotate", "noise")
    for i, exp in enumerate(bm.train_stream):
        assert exp.current_experience == i and exp.task_label == 0
        assert exp.classes_in_this_experience == list(range(10))
        x, y, t = exp.dataset[0]
        assert x.shape == (1, 8, 8) and int(t) == 0
    for j, exp in enumerate(bm.test_stream):
        assert exp.current_experience == j and exp.task_labels == [0]
        assert exp.classes_in_this_experience == list(range(10))
        assert len(exp.dataset) == len(digits[1][1])


def _undo(images, domain):
    return {"clean": images, "invert": 1.0 - images, "rotate": torch.rot90(images, -1, dims=(-2, -1))}[domain]


def _rows(images, labels):
    return Counter((tuple(x.flatten().tolist()), int(y)) for x, y in zip(images, labels))


def test_train_shares_are_disjoint_class_stratified_and_cover_the_data(digits):
    train, test = digits
    domains = ("clean", "invert", "rotate", "clean")
    bm = domain_benchmark(train, test, domains, seed=3)
    seen = Counter()
    for exp, domain in zip(bm.train_stream, domains):
        x, y = torch.stack([s[0] for s in exp.dataset]), torch.tensor([int(s[1]) for s in exp.dataset])
        assert list(exp.dataset.targets) == y.tolist()  # the targets Avalanche reads
        per_class = torch.bincount(y, minlength=10)
        share = torch.bincount(train[1], minlength=10).float() / len(domains)
        assert ((per_class.float() - share).abs() <= 1).all()  # class-stratified, near-equal shares
        rows = _rows(_undo(x, domain), y)
        assert not (seen & rows)  # disjoint from the earlier shares
        seen += rows
    assert seen == _rows(*train)  # together they are exactly the training data
    # the shuffle is seeded: the same seed gives the same shares, another seed other ones
    again = domain_benchmark(train, test, domains, seed=3).train_stream[0].dataset
    other = domain_benchmark(train, test, domains, seed=4).train_stream[0].dataset
    first = bm.train_stream[0].dataset
    assert torch.equal(torch.stack([s[0] for s in again]), torch.stack([s[0] for s in first]))
    assert len(other) != len(first) or not torch.equal(
        torch.stack([s[0] for s in other]), torch.stack([s[0] for s in first]))


def test_test_experience_j_is_domain_j_applied_to_the_test_images(digits):
    train, (test_x, test_y) = digits
    domains = ("clean", "invert", "rotate", "blur", "noise", "occlude")
    bm = domain_benchmark(train, (test_x, test_y), domains, seed=0)
    for j, (exp, domain) in enumerate(zip(bm.test_stream, domains)):
        x = torch.stack([s[0] for s in exp.dataset])
        y = torch.tensor([int(s[1]) for s in exp.dataset])
        assert torch.equal(y, test_y)
        assert torch.equal(x, shift_images(test_x, domain, _generator(0, _TEST, j)))
    noisy = torch.stack([s[0] for s in bm.test_stream[4].dataset])
    rebuilt = domain_benchmark(train, (test_x, test_y), domains, seed=0).test_stream[4].dataset
    assert torch.equal(noisy, torch.stack([s[0] for s in rebuilt]))  # reproducible
    reseeded = domain_benchmark(train, (test_x, test_y), domains, seed=1).test_stream[4].dataset
    assert not torch.equal(noisy, torch.stack([s[0] for s in reseeded]))


def test_test_per_class_keeps_the_first_images_of_each_class(digits):
    train, (test_x, test_y) = digits
    bm = domain_benchmark(train, (test_x, test_y), ("invert", "clean"), test_per_class=3)
    x = torch.stack([s[0] for s in bm.test_stream[1].dataset])
    y = torch.tensor([int(s[1]) for s in bm.test_stream[1].dataset])
    assert torch.bincount(y).tolist() == [3] * 10
    keep = torch.cat([(test_y == c).nonzero().squeeze(1)[:3] for c in range(10)]).sort().values
    assert torch.equal(x, test_x[keep]) and torch.equal(y, test_y[keep])
    with pytest.raises(ValueError, match=r"test_per_class=0 is not allowed: use None or an int >= 1"):
        domain_benchmark(train, (test_x, test_y), test_per_class=0)


def test_classes_too_small_for_the_domains_are_refused(digits):
    (x, y), test = digits
    keep = torch.cat([(y == c).nonzero().squeeze(1)[:2] for c in range(10)])
    with pytest.raises(ValueError, match=r"class 0 has 2 training images, fewer than the 4 domains"):
        domain_benchmark((x[keep], y[keep]), test)


def test_csko_dces_runs_over_the_digit_domains():
    heads = []

    def factory(evaluator):
        torch.manual_seed(0)
        model = ClassIncrementalNet(SmallCNN(10, width=8).features, SmallCNN(10, width=8).feature_dim)
        heads.append(model.head)
        return build_method("csko_dces", model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-2),
                            evaluator=evaluator, train_epochs=1, train_mb_size=32, eval_mb_size=512, score_batches=1)

    result = run_continual(split_digits_domains(), factory, progress=False)
    assert result.completed == result.total == 4
    assert len(result.accuracy) == 4 and all(len(row) == 4 for row in result.accuracy)
    assert all(0.0 <= a <= 1.0 for row in result.accuracy for a in row)
    assert heads[-1].classifier.out_features == 10  # the expanding head saw all ten classes at once
    assert "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp003" in result.metrics


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_domains(fmnist_root):
    bm = fashion_mnist_domains(fmnist_root, train_per_class=8, test_per_class=3)
    assert len(bm.train_stream) == len(bm.test_stream) == 4
    for exp in bm.train_stream:
        assert len(exp.dataset) == 20 and exp.classes_in_this_experience == list(range(10))  # 8 per class / 4
        assert exp.dataset[0][0].shape == (1, 28, 28)
    assert [len(e.dataset) for e in bm.test_stream] == [30] * 4
    clean, inverted = (torch.stack([s[0] for s in bm.test_stream[j].dataset]) for j in (0, 1))
    assert torch.allclose(inverted, 1.0 - clean)


def test_fashion_digits_brings_digits_as_classes_10_to_19(fmnist_root):
    bm = fashion_digits_benchmark(fmnist_root, classes_per_exp=2, train_per_class=5, test_per_class=2)
    expected = [list(range(10)), [10, 11], [12, 13], [14, 15], [16, 17], [18, 19]]
    assert [e.classes_in_this_experience for e in bm.train_stream] == expected
    assert [e.classes_in_this_experience for e in bm.test_stream] == expected
    assert {e.task_label for e in bm.train_stream} == {0}
    assert [len(e.dataset) for e in bm.train_stream] == [50] + [10] * 5
    for exp in bm.train_stream:
        x = torch.stack([s[0] for s in exp.dataset])
        assert x.shape[1:] == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    five = fashion_digits_benchmark(fmnist_root, classes_per_exp=5, train_per_class=2, test_per_class=1)
    assert [e.classes_in_this_experience for e in five.train_stream] == [list(range(10)), list(range(10, 15)),
                                                                         list(range(15, 20))]


def test_fashion_digits_resizes_the_digits_bilinearly(fmnist_root):
    bm = fashion_digits_benchmark(fmnist_root, classes_per_exp=10, train_per_class=1, test_per_class=1)
    (data,) = split_digits(n_tasks=1, seed=0)
    x, y, _ = data.train.tensors
    first = torch.cat([(y == c).nonzero().squeeze(1)[:1] for c in range(10)]).sort().values
    resized = torch.nn.functional.interpolate(x[first], size=(28, 28), mode="bilinear", align_corners=False)
    exp = bm.train_stream[1]
    assert torch.equal(torch.stack([s[0] for s in exp.dataset]), resized)
    assert [int(s[1]) for s in exp.dataset] == (y[first] + 10).tolist()


def test_bad_classes_per_exp_is_refused():  # checked before any data is read: no Fashion-MNIST needed
    for bad in (3, 0, -2, 4, "2", True):
        with pytest.raises(ValueError, match=re.escape(f"classes_per_exp={bad!r} is not allowed: it must divide")):
            fashion_digits_benchmark(classes_per_exp=bad)
