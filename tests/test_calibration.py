"""One pass over the background: query calibration and slot statistics from the same captured layer inputs."""

from dataclasses import replace

import pytest
import torch

from smf_lib.calibration import calibrate_keys, calibrate_queries, spherical_kmeans
from smf_lib.data import load_background
from smf_lib.models import load_base_model
from smf_lib.retrofit import MemoryConfig, RetrofitError, memory_layers, retrofit
from smf_lib.stats import collect_background, layer_inputs, name_positions


def fresh_memory():
    model, tokenizer = load_base_model("tiny")
    return retrofit(model, MemoryConfig(n_keys=16, topk=4, key_dim=32)), tokenizer


def test_captured_inputs_give_the_same_calibration_and_statistics():
    texts = load_background()[:21]  # not a multiple of the batch size: the last chunk is short
    streamed, tokenizer = fresh_memory()
    calibrate_queries(streamed, tokenizer, texts, seed=3, progress=False)
    expected = collect_background(streamed, tokenizer, texts, batch_size=8, progress=False)

    shared, _ = fresh_memory()
    inputs = layer_inputs(shared, tokenizer, texts, progress=False)
    calibrate_queries(shared, tokenizer, texts, seed=3, inputs=inputs)
    for a, b in zip(memory_layers(streamed), memory_layers(shared)):
        torch.testing.assert_close(a.query.weight, b.query.weight)
    got = collect_background(shared, tokenizer, texts, batch_size=8, inputs=inputs)

    assert (got.n_batches, got.n_tokens) == (expected.n_batches, expected.n_tokens) == (21, len(inputs.text))
    for i in expected.counts:
        torch.testing.assert_close(got.counts[i], expected.counts[i], rtol=1e-5, atol=1e-6)
        assert (got.doc_freq[i] - expected.doc_freq[i]).abs().sum() <= 2  # a weight at the underflow edge may differ
        assert expected.counts[i].sum() == pytest.approx(expected.n_tokens * memory_layers(shared)[0].heads)


def test_captured_inputs_refuse_other_texts_and_trained_memory():
    model, tokenizer = fresh_memory()
    texts = load_background()[:6]
    inputs = layer_inputs(model, tokenizer, texts, progress=False)
    with pytest.raises(ValueError, match="captured from 6 texts"):
        calibrate_queries(model, tokenizer, texts[:5], inputs=inputs)
    with torch.no_grad():
        memory_layers(model)[0].values.weight[3] = 1.0
    with pytest.raises(ValueError, match="every value row is zero"):
        collect_background(model, tokenizer, texts, inputs=inputs)


def test_name_positions_mark_names_and_numbers_not_sentence_openings():
    _, tokenizer = load_base_model("tiny")
    text = ("The bridge in Lisbon opened in 1966. Later, Maria crossed it.\nQuestion: Who built it?\n"
            "Answer: Edgar Cardoso.")
    mask = name_positions(tokenizer, [text])[0]
    ids = tokenizer(text)["input_ids"]
    marked = [tokenizer.decode([i]).strip() for i, keep in zip(ids, mask) if keep]
    assert "".join(marked) == "Lisbon1966MariaWhoEdgarCardoso"


def test_background_counted_at_names_from_captured_inputs_and_streamed_agree():
    texts = load_background()[:21]
    model, tokenizer = fresh_memory()
    inputs = layer_inputs(model, tokenizer, texts, progress=False)
    calibrate_queries(model, tokenizer, texts, seed=3, inputs=inputs)
    shared = collect_background(model, tokenizer, texts, batch_size=8, inputs=inputs, positions="names")
    streamed = collect_background(model, tokenizer, texts, batch_size=8, progress=False, positions="names")
    everywhere = collect_background(model, tokenizer, texts, batch_size=8, inputs=inputs)
    n_names = sum(map(sum, name_positions(tokenizer, texts)))
    assert shared.positions == streamed.positions == "names" and everywhere.positions == "all"
    assert shared.n_tokens == streamed.n_tokens == n_names and 0 < n_names < everywhere.n_tokens
    for i in shared.counts:
        torch.testing.assert_close(shared.counts[i], streamed.counts[i], rtol=1e-5, atol=1e-6)
        assert shared.counts[i].sum() == pytest.approx(n_names * memory_layers(model)[0].heads)
        assert (shared.counts[i] <= everywhere.counts[i] + 1e-6).all()  # a subset of the same reads
    with pytest.raises(ValueError, match="positions must be one of all, names"):
        collect_background(model, tokenizer, texts, positions="nouns")


def test_spherical_kmeans_finds_separated_directions():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3]
    x = torch.nn.functional.normalize(centres.repeat(50, 1) + 0.05 * torch.randn(150, 8, generator=generator), dim=1)
    found = spherical_kmeans(x, 3, iterations=10, generator=generator)
    assert torch.allclose(found.norm(dim=1), torch.ones(3))
    assert (found @ centres.T).max(0).values.min() > 0.99  # each true direction has its centroid


def test_kmeans_keys_fit_the_background_queries_better_than_random_keys():
    texts = load_background()[:24]
    model, tokenizer = fresh_memory()
    inputs = layer_inputs(model, tokenizer, texts, progress=False)
    calibrate_queries(model, tokenizer, texts, seed=3, inputs=inputs)

    @torch.no_grad()
    def best_sub_key_scores() -> float:  # mean cosine of each background sub-query to its nearest sub-key
        return sum(float(s.max(-1).values.mean()) for m in memory_layers(model)
                   for s in m.sub_key_scores(inputs.x[m.layer_index]))

    before = best_sub_key_scores()
    calibrate_keys(model, inputs, seed=3)
    assert best_sub_key_scores() > before + 0.1
    assert all(torch.allclose(m.keys.norm(dim=-1), torch.ones(())) for m in memory_layers(model))
    assert all((m.values.weight == 0).all() for m in memory_layers(model))  # the model's function is unchanged


def test_kmeans_keys_need_normalised_queries_in_additive_mode():
    for config in (MemoryConfig(key_init="kmeans", qk_norm=False), MemoryConfig(key_init="kmeans", mode="replace"),
                   MemoryConfig(key_init="clustered")):
        model, _ = load_base_model("tiny")
        with pytest.raises(RetrofitError, match="key_init must be one of"):
            retrofit(model, replace(config, n_keys=16, topk=4, key_dim=32))
