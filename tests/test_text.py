"""Text chapter: model loading, the three leaks, text metrics and the text scrubber."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dlgkit import metrics, nlp, viz
from dlgkit.attacks import text as ta

SHORT = nlp.SAMPLE_SENTENCES[1]  # "The patient was admitted with chest pain." (10 tokens)


@pytest.fixture(scope="module")
def pretrained():
    return nlp.load_text_model(pretrained=True)


@pytest.fixture(scope="module")
def scratch():
    return nlp.load_text_model(pretrained=False, seed=0)


def test_bundled_model_is_eager_and_in_eval_mode(pretrained):
    assert pretrained.model.config._attn_implementation == "eager"
    assert not pretrained.model.training
    assert pretrained.model.config.vocab_size == 30522 and pretrained.model.config.hidden_size == 384
    ids = pretrained.encode("Hello world")["input_ids"][0]
    assert pretrained.tokens(ids) == ["[CLS]", "hello", "world", "[SEP]"]


def test_random_initialisation_differs_and_is_seeded(pretrained, scratch):
    again = nlp.load_text_model(pretrained=False, seed=0)
    w = "bert.encoder.layer.0.attention.self.query.weight"
    state_a, state_b = dict(scratch.model.named_parameters()), dict(again.model.named_parameters())
    assert torch.equal(state_a[w], state_b[w])
    assert not torch.allclose(state_a[w], dict(pretrained.model.named_parameters())[w])


def test_sample_sentences_cover_8_to_40_tokens(pretrained):
    lengths = [len(pretrained.tokenizer(s)["input_ids"]) for s in nlp.SAMPLE_SENTENCES]
    assert min(lengths) >= 8 and max(lengths) <= 40 and max(lengths) >= 30
    assert nlp.SAMPLE_SENTENCES[0] == nlp.PAPER_SENTENCE


def test_named_model_needs_explicit_download():
    with pytest.raises(ValueError, match="download=True"):
        nlp.load_text_model("bert-base-uncased")


def test_download_offline_gives_a_clear_error():
    code = "from dlgkit import nlp\ntry:\n    nlp.load_text_model('bert-base-uncased', download=True)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ERR could not load 'bert-base-uncased'" in out.stdout and "name=None" in out.stdout, out.stdout + out.stderr


def test_sdpa_attention_is_rejected_with_the_fix(pretrained):
    class Config:
        _attn_implementation = "sdpa"

    class Fake(torch.nn.Module):
        config = Config()

    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        nlp.check_double_backward(Fake())


def test_encode_rejects_empty_and_too_long_input(pretrained):
    with pytest.raises(ValueError, match="empty"):
        pretrained.encode("   ")
    with pytest.raises(ValueError, match="no text"):
        pretrained.encode([])
    with pytest.raises(ValueError, match="limit of 512"):
        pretrained.encode("word " * 600)


def test_text_gradient_checks_labels(pretrained):
    with pytest.raises(ValueError, match="one label per sentence"):
        nlp.text_gradient(pretrained, [SHORT, SHORT], 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nlp.text_gradient(pretrained, SHORT, 3)


@pytest.mark.parametrize("index", [0, 1, 5])
def test_bag_of_words_length_and_label(pretrained, index):
    sentence = nlp.SAMPLE_SENTENCES[index]
    ids = pretrained.encode(sentence)["input_ids"][0]
    grads = nlp.text_gradient(pretrained, sentence, index % 2)
    bag = ta.bag_of_words(grads, pretrained)
    assert bag.ids.tolist() == sorted(set(ids.tolist()))
    assert bag.length == len(ids)
    assert ta.text_label(grads, pretrained) == index % 2



def test_outlier_bag_survives_noise_that_defeats_the_exact_test(pretrained):
    from dlgkit import defences

    grads = nlp.text_gradient(pretrained, nlp.PAPER_SENTENCE, 1)
    ids = pretrained.encode(nlp.PAPER_SENTENCE)["input_ids"][0]
    truth = sorted(set(ids.tolist()))
    assert ta.bag_of_words(grads, pretrained, rule="outliers").ids.tolist() == truth  # clean: same as exact
    names = list(grads)
    noisy = dict(zip(names, defences.add_noise(list(grads.values()), 1e-10, generator=torch.Generator().manual_seed(0))))
    exact = ta.bag_of_words(noisy, pretrained)
    assert len(exact) == pretrained.model.config.vocab_size and exact.length == pretrained.max_length  # every row non-zero
    robust = ta.bag_of_words(noisy, pretrained, rule="outliers")
    assert robust.ids.tolist() == truth and robust.length == len(ids)
    drowned = dict(zip(names, defences.add_noise(list(grads.values()), 1e-4, generator=torch.Generator().manual_seed(0))))
    assert len(set(ta.bag_of_words(drowned, pretrained, rule="outliers").ids.tolist()) & set(truth)) < len(truth) // 2
    with pytest.raises(ValueError, match="rule="):
        ta.bag_of_words(grads, pretrained, rule="threshold")
    with pytest.raises(ValueError, match="positive"):
        ta.bag_of_words(grads, pretrained, rule="outliers", k=0)

@pytest.mark.parametrize("index", [0, 2, 7])
def test_span_method_recovers_sentences_exactly(pretrained, index):
    sentence = nlp.SAMPLE_SENTENCES[index]
    ids = pretrained.encode(sentence)["input_ids"][0]
    grads = nlp.text_gradient(pretrained, sentence, 1)
    span = ta.span_recover(grads, pretrained)
    assert span.ids.tolist() == ids.tolist()
    assert metrics.token_accuracy(span.ids, ids) == 1.0
    assert span.rank == len(ids) and len(span.found) == len(ids)
    assert pretrained.decode(span.ids) == sentence.lower()


def test_span_method_finds_each_positions_token_set_in_a_batch(pretrained):
    batch = list(nlp.SAMPLE_SENTENCES[1:4])
    grads = nlp.text_gradient(pretrained, batch, [0, 1, 0])
    span = ta.span_recover(grads, pretrained)
    enc = pretrained.encode(batch)
    for p, found in enumerate(span.per_position()):
        truth = {int(enc["input_ids"][b, p]) for b in range(3) if enc["attention_mask"][b, p]}
        assert set(found) == truth, p


def test_span_candidates_validation(pretrained):
    grads = nlp.text_gradient(pretrained, SHORT, 0)
    with pytest.raises(ValueError, match="candidates"):
        ta.span_recover(grads, pretrained, candidates="words")
    with pytest.raises(KeyError, match="computed on this model"):
        ta.bag_of_words({"x": torch.zeros(1)}, pretrained)
    with pytest.raises(TypeError, match="dict"):
        ta.bag_of_words([torch.zeros(1)], pretrained)


def test_dlg_recovers_a_short_sentence_on_a_random_model(scratch):
    ids = scratch.encode(SHORT)["input_ids"][0]
    grads = nlp.text_gradient(scratch, SHORT, 0)
    result = ta.reconstruct_text(scratch, grads, ta.TextAttackConfig(iterations=120), record_every=20, progress=False)
    assert result.iters[0] == 0 and result.iters[-1] == 120 and len(result.history) == len(result.iters)
    assert result.losses[-1] < 0.05 * result.losses[0]
    assert metrics.token_accuracy(result.ids, ids, ignore=[101, 102]) >= 0.9
    assert metrics.rouge(result.text, SHORT.lower())["rouge1"] >= 0.9
    table = ta.history_table(result, ids, scratch, fmt="text")
    assert table.splitlines()[-1] == "[ground truth] " + SHORT.lower()
    assert "**" in table.splitlines()[0], "the random start should have wrong tokens marked"


def test_euclidean_decoding_collapses_to_padding_on_a_random_model(scratch):
    grads = nlp.text_gradient(scratch, SHORT, 0)
    result = ta.reconstruct_text(scratch, grads, ta.TextAttackConfig(iterations=30), progress=False)
    bag = ta.bag_of_words(grads, scratch)
    euclid = ta.decode_embeddings(scratch, result.embeddings[1:-1], "euclidean")
    assert (euclid == scratch.tokenizer.pad_token_id).float().mean() > 0.5
    inside = ta.decode_embeddings(scratch, result.embeddings, "bag", bag=bag.ids)
    assert set(inside.tolist()) <= set(bag.ids.tolist())
    with pytest.raises(ValueError, match="needs the bag"):
        ta.decode_embeddings(scratch, result.embeddings, "bag")


def test_reconstruct_text_rejects_bad_options(scratch):
    grads = nlp.text_gradient(scratch, SHORT, 0)
    for kwargs, match in [({"parametrization": "onehot"}, "parametrization"), ({"decode": "nearest"}, "decode"), ({"optimizer": "sgd"}, "optimizer"), ({"distance": "l1"}, "distance"), ({"span_weight": -1.0}, "span_weight")]:
        with pytest.raises(ValueError, match=match):
            ta.TextAttackConfig(iterations=1, **kwargs)
    one = ta.TextAttackConfig(iterations=1)
    for kwargs, match in [({"length": 2}, r"length must be an int in \[3, 512\]"), ({"length": 10_000}, "length must be an int"), ({"length": 5.5}, "length must be an int"),
                          ({"label": 2}, r"label must be an int class index in \[0, 2\)"), ({"label": 0.5}, "label must be"), ({"seed": 0.5}, "seed must be an int"),
                          ({"record_every": 0}, "record_every must be a positive int")]:
        with pytest.raises(ValueError, match=match):
            ta.reconstruct_text(scratch, grads, one, **kwargs)
    with pytest.raises(TypeError, match="TextAttackConfig"):
        ta.reconstruct_text(scratch, grads, {"iterations": 1})


def test_text_attacks_flag_nan_gradients_and_bad_arguments(scratch):
    grads = nlp.text_gradient(scratch, SHORT, 0)
    broken = dict(grads)
    name = next(k for k in grads if "word_embeddings" in k)
    broken[name] = grads[name].clone()
    broken[name][5, 0] = float("nan")
    for call in (lambda: ta.bag_of_words(broken, scratch), lambda: ta.span_recover(broken, scratch), lambda: ta.text_label(broken, scratch),
                 lambda: ta.reconstruct_text(scratch, broken, ta.TextAttackConfig(iterations=1))):
        with pytest.raises(ValueError, match="holds NaN or inf"):
            call()
    with pytest.raises(ValueError, match=r"threshold must lie in \[0.0, inf\)"):
        ta.span_recover(grads, scratch, threshold=-1e-6)
    with pytest.raises(ValueError, match="length must be an int"):
        ta.span_recover(grads, scratch, length=0)
    with pytest.raises(ValueError, match="length must be an int"):
        ta.span_recover(grads, scratch, length=513)


def test_reconstruct_text_leaves_the_model_alone(scratch):
    grads = nlp.text_gradient(scratch, SHORT, 0)
    scratch.model.zero_grad(set_to_none=True)
    ta.reconstruct_text(scratch, grads, ta.TextAttackConfig(iterations=2), progress=False)
    assert all(p.grad is None for p in scratch.model.parameters()) and not scratch.model.training


def test_token_accuracy_and_rouge():
    assert metrics.token_accuracy([101, 5, 6, 7, 102], [101, 5, 9, 7, 102], ignore=[101, 102]) == pytest.approx(2 / 3)
    assert metrics.token_accuracy([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    with pytest.raises(TypeError, match="token ids"):
        metrics.token_accuracy("abc", [1])
    r = metrics.rouge("the cat sat on the mat", "the cat sat on a mat")
    assert 0.8 < r["rouge1"] < 1 and r["rouge2"] == pytest.approx(0.6)
    assert metrics.rouge("a b c", "a b c") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_text_batches_are_aligned_by_rouge():
    refs = ["the patient was admitted", "transfer the balance today", "meet every monday"]
    preds = ["meet every monday", "the patient was admitted", "transfer the balance"]
    perm = metrics.align_texts(preds, refs)
    assert perm.tolist() == [1, 2, 0]
    report = metrics.text_report(preds, refs)
    assert report["exact"] == pytest.approx(2 / 3) and report["rouge1"] > 0.9
    with pytest.raises(ValueError, match="equal length"):
        metrics.align_texts(preds[:2], refs)


@pytest.mark.parametrize("mode", ["stack", "callback"])
def test_text_scrubber(mode):
    box = viz.text_scrubber(["<p>a</p>", "<p>b</p>", "<p>c</p>"], [0, 10, 20], mode=mode)
    assert box.slider.max == 2 and box.mode == mode
    if mode == "callback":
        box.slider.value = 2
        assert "c" in box.children[1].children[1].value and "20" in box.children[1].children[0].value
    with pytest.raises(ValueError, match="equal length"):
        viz.text_scrubber(["<p>a</p>"], [0, 1])


def test_span_method_under_defences_with_a_given_rank(pretrained):
    from dlgkit import defences

    ids = pretrained.encode(SHORT)["input_ids"][0]
    grads = nlp.text_gradient(pretrained, SHORT, 0)
    names, values = list(grads), list(grads.values())
    half = dict(zip(names, defences.quantise(values, "fp16")))
    assert ta.span_recover(half, pretrained).ids.tolist() == ids.tolist()
    noisy = dict(zip(names, defences.add_noise(values, 1e-12, generator=torch.Generator().manual_seed(0))))
    assert len(ta.bag_of_words(noisy, pretrained)) == pretrained.model.config.vocab_size, "noise should fill every row"
    span = ta.span_recover(noisy, pretrained, candidates=torch.tensor(sorted(set(ids.tolist()))), length=len(ids), rank=len(ids))
    assert span.rank == len(ids) and metrics.token_accuracy(span.ids, ids) >= 0.9
    loud = dict(zip(names, defences.add_noise(values, 1e-6, generator=torch.Generator().manual_seed(0))))
    assert metrics.token_accuracy(ta.span_recover(loud, pretrained, candidates="vocab", length=len(ids), rank=len(ids)).ids, ids) < 0.5
