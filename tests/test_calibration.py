"""One pass over the background: query calibration and slot statistics from the same captured layer inputs."""

from dataclasses import replace

import pytest
import torch

from smf_lib.calibration import (
    answer_contexts,
    calibrate_keys,
    calibrate_queries,
    discriminant_directions,
    spherical_kmeans,
)
from smf_lib.data import load_background, load_facts
from smf_lib.models import load_base_model
from smf_lib.pipeline import prepare_memory
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


def test_discriminant_directions_follow_what_tells_facts_apart_not_what_varies_most():
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(4000, 6, generator=generator)
    owner = torch.arange(20).repeat_interleave(5)  # 20 facts, 5 wordings each
    contexts = torch.randn(100, 6, generator=generator) * 0.1
    contexts[:, 0] += 3 * torch.randn(20, generator=generator)[owner]  # facts differ along axis 0
    contexts[:, 1] += 5 * torch.randn(100, generator=generator)  # wordings of one fact differ more, along axis 1
    found = discriminant_directions(background, contexts, owner, rank=1)
    unit = found[0] / found[0].norm()
    assert unit[0].abs() > 0.99
    assert (background.double() @ found.T).std().item() == pytest.approx(1, abs=0.02)  # unit background variance
    with pytest.raises(ValueError, match="needs more than 20 practice facts"):
        discriminant_directions(background, contexts, owner, rank=20)


def test_queries_of_rank_r_read_only_the_practice_facts_directions():
    texts = load_background()[:24]
    model, tokenizer = load_base_model("tiny")
    config = MemoryConfig(n_keys=16, topk=4, key_dim=32, query_rank=3)
    with pytest.raises(ValueError, match="needs practice facts"):
        prepare_memory(model, tokenizer, texts, config, progress=False)
    model, tokenizer = load_base_model("tiny")
    practice = load_facts(split="tune")[:10]
    prepare_memory(model, tokenizer, texts, config, progress=False, practice=practice)
    contexts, owner = answer_contexts(model, tokenizer, practice)
    assert owner.tolist() == sorted(owner.tolist()) and owner.max() == 9
    assert all(len(c) == len(owner) for c in contexts.values())
    for m in memory_layers(model):
        singular = torch.linalg.svdvals(m.query.weight.double())
        assert int((singular > 1e-4 * singular[0]).sum()) == 3
    with pytest.raises(RetrofitError, match="query_rank is a number of directions"):
        retrofit(load_base_model("tiny")[0], replace(config, mode="replace"))
