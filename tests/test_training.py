"""The sparse trainer is exact (rows not selected at a step do not move at that step), deterministic, and the
baselines run; sparse memory finetuning also runs inside Hugging Face `Trainer`."""

import copy
import dataclasses

import pytest
import torch
from accelerate import Accelerator

from smf_lib.analysis import gate_openness
from smf_lib.batches import Example, answer_tokens, build_examples, collate, counted_positions
from smf_lib.data import load_facts
from smf_lib.losses import next_token_losses, predicting
from smf_lib.optim import SparseMemoryOptimizer
from smf_lib.prefix import block_inputs, first_memory_block
from smf_lib.retrofit import decoder_layers, memory_layers
from smf_lib.stats import recording
from smf_lib.training import (
    METHODS,
    Batches,
    TrainConfig,
    autocast_dtype,
    locality_penalty,
    make_optimizer,
    token_loss_sum,
    train,
)

FACTS = load_facts(limit=4)


@pytest.fixture
def tiny(tiny_ready):
    return tiny_ready


def _trained(tiny, **config):
    model, tokenizer, background = tiny
    return train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(**config), background=background, progress=False)


@pytest.mark.parametrize("optimizer,weight_decay", [("sgd", 0.0), ("adam", 0.0), ("adam", 0.1)])
def test_each_step_moves_only_its_selected_rows_and_never_the_base(tiny, optimizer, weight_decay, checked_steps):
    model, tokenizer, background = tiny
    selections = checked_steps
    config = TrainConfig(steps=5, batch_size=4, top_t=8, optimizer=optimizer, weight_decay=weight_decay, lr=0.5)
    trained, history = train(copy.deepcopy(model), tokenizer, FACTS, config, background=background, progress=False)
    assert len(selections) == 5 and all(len(r) for rows in selections for r in rows)
    assert history.selected == [{m.layer_index: len(r) for m, r in zip(memory_layers(model), rows)}
                                for rows in selections]
    old = dict(model.named_parameters())
    for name, p in trained.named_parameters():
        if not name.endswith("values.weight"):
            assert torch.equal(p, old[name]), name
    for m_old, m_new, *rows in zip(memory_layers(model), memory_layers(trained), *selections):
        assert (m_new.values.weight[torch.cat(rows)] != m_old.values.weight[torch.cat(rows)]).any()


def test_same_seed_same_result(tiny):
    a, ha = _trained(tiny, method="smf_kl", steps=3, batch_size=4, top_t=8)
    b, hb = _trained(tiny, method="smf_kl", steps=3, batch_size=4, top_t=8)
    assert ha.loss == hb.loss
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_through_one_api(tiny, method):
    model, _, _ = tiny
    trained, history = _trained(tiny, method=method, steps=3, batch_size=4)
    assert len(history.loss) == 3 and all(torch.isfinite(torch.tensor(history.loss)))
    assert history.params_trained > 0
    assert type(trained) is type(model)  # LoRA is merged back
    changed = sum(int((p != q).sum()) for p, q in zip(trained.parameters(), model.parameters()))
    assert changed > 0


def test_callback_can_stop_training(tiny):
    model, tokenizer, background = tiny
    _, history = train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=10, batch_size=4),
                       background=background, progress=False, callback=lambda step, m: {"x": step, "stop": step == 2})
    assert len(history.loss) == 2 and history.checkpoints == [{"step": 1, "x": 1}, {"step": 2, "x": 2}]


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="Unknown method"):
        TrainConfig(method="smf_magic")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="locality"):
        TrainConfig(method="full_ft", locality=1.0)
    with pytest.raises(ValueError, match="write_on must be one of"):
        TrainConfig(write_on="answer")
    with pytest.raises(ValueError, match="locality term"):
        TrainConfig(write_on="counted", locality=1.0)
    with pytest.raises(ValueError, match="dense_scope"):
        TrainConfig(method="lora", dense_scope="memory_mlps")
    with pytest.raises(ValueError, match="dense_scope"):
        TrainConfig(method="full_ft", dense_scope="attention")


def test_a_long_training_sentence_keeps_its_answer_or_is_refused(tiny):
    _, tokenizer, _ = tiny
    preamble = "In the long history of the northern provinces, as the old chronicles of the valley tell it, " * 3
    fact = dataclasses.replace(FACTS[0], train=(preamble + FACTS[0].train[0],))
    length = len(tokenizer(fact.train[0])["input_ids"])
    assert length > 64
    example = build_examples([fact], tokenizer, max_length=length)[0]
    answer_ids = [i for i, on in zip(example.input_ids, example.answer_mask) if on]
    assert len(example.input_ids) == length and FACTS[0].answer in tokenizer.decode(answer_ids)
    with pytest.raises(ValueError, match=f"{fact.id}.*{length} tokens, more than max_length={length - 1}"):
        build_examples([fact], tokenizer, max_length=length - 1)


def test_trainer_hooks_are_removed_after_training(tiny):
    trained, _ = _trained(tiny, method="smf_kl", steps=1, batch_size=4)
    assert not trained._forward_pre_hooks and not any(m._forward_hooks for m in memory_layers(trained))
    copy.deepcopy(trained)  # nothing left that refers to the optimizer


def test_sparse_method_needs_background(tiny):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match="background"):
        train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=1), background=None, progress=False)


def test_background_must_be_counted_where_the_configuration_says(tiny):
    model, tokenizer, background = tiny
    with pytest.raises(ValueError, match="counted at 'all' positions but the configuration says background_on"):
        train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=1, background_on="names"),
              background=background, progress=False)
    with pytest.raises(ValueError, match="background_on must be one of all, names"):
        TrainConfig(background_on="nouns")
    _, history = train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=1, method="smf_random",
                       background_on="names"), background=background, progress=False)  # random needs no counts
    assert len(history.loss) == 1


def test_warmup_scales_the_first_steps(tiny):
    """Row-wise Adam's first step moves each coordinate of a selected row by about lr; with a linear warm-up over
    ten steps, by a tenth of it."""
    def largest_move(**config):
        trained, _ = _trained(tiny, steps=1, batch_size=4, top_t=8, lr=0.5, **config)
        return max(m.values.weight.abs().max().item() for m in memory_layers(trained))

    assert largest_move() == pytest.approx(0.5, rel=1e-3)
    assert largest_move(warmup=10) == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(ValueError, match="warmup must be a number of steps >= 0"):
        TrainConfig(warmup=-1)


def test_loss_floor_stops_the_gradient_of_tokens_already_learned(tiny):
    """Tokens predicted with a loss below the floor count at the floor and give no gradient; the others count as
    they are."""
    model, tokenizer, _ = tiny
    model = copy.deepcopy(model)
    batch = dict(tokenizer(["The capital of France is Paris, and of Spain Madrid."], return_tensors="pt"))
    with torch.no_grad():
        losses = next_token_losses(model(**batch).logits, batch["input_ids"])[0, :-1]
    batch["answer"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    floor = float(losses.median())
    total, n = token_loss_sum(model, batch, "all", floor)
    assert n == len(losses) and total.item() == pytest.approx(float(losses.clamp_min(floor).sum()), rel=1e-5)
    plain = token_loss_sum(model, batch, "all")[0]
    assert plain.item() == pytest.approx(float(losses.sum()), rel=1e-5)
    plain.backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())
    model.zero_grad()
    token_loss_sum(model, batch, "all", float(losses.max()) + 1)[0].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="loss_floor must be"):
        TrainConfig(loss_floor=-0.1)


def _loudness(model, background) -> float:
    return locality_penalty(model, background.inputs, 512, torch.Generator().manual_seed(1)).item()


def test_locality_term_keeps_the_memory_quiet_on_background_text(tiny):
    model, tokenizer, background = tiny
    assert _loudness(model, background) == 0.0  # a fresh memory adds nothing
    plain, _ = _trained(tiny, steps=6, batch_size=4, top_t=16)
    local, history = _trained(tiny, steps=6, batch_size=4, top_t=16, locality=100.0)
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert 0 < _loudness(local, background) < 0.5 * _loudness(plain, background)


def test_trained_gates_move_only_with_a_gate_rate_and_quiet_the_memory_further_under_a_locality_term(tiny):
    model, tokenizer, background = tiny
    gates = [m.gate.weight.clone() for m in memory_layers(model)]
    frozen, _ = _trained(tiny, steps=6, batch_size=4, top_t=16, locality=100.0)
    assert all(torch.equal(m.gate.weight, g) for m, g in zip(memory_layers(frozen), gates))
    gated, history = _trained(tiny, steps=6, batch_size=4, top_t=16, locality=100.0, gate_lr=1e-2)
    assert all(not torch.equal(m.gate.weight, g) for m, g in zip(memory_layers(gated), gates))
    assert history.params_trained == sum(m.values.weight.numel() + m.gate.weight.numel()
                                         for m in memory_layers(gated))
    assert not any(p.requires_grad for p in gated.parameters())
    assert 0 < _loudness(gated, background) < _loudness(frozen, background)
    ordinary = [f.train[0] for f in load_facts()[50:58]]  # background sentences: where the gates learned to shut
    unchanged = {m.layer_index: 1.0 for m in memory_layers(model)}
    assert gate_openness(frozen, model, tokenizer, ordinary) == pytest.approx(unchanged)
    assert all(0 < ratio < 1 for ratio in gate_openness(gated, model, tokenizer, ordinary).values())
    with pytest.raises(ValueError, match="gate_lr must be >= 0 and is for sparse methods only"):
        TrainConfig(method="lora", gate_lr=1e-3)


def test_row_dropout_is_set_on_the_memory_while_training_and_taken_off_after(tiny):
    model, tokenizer, background = tiny
    model = copy.deepcopy(model)
    optimizer = SparseMemoryOptimizer(model, background, top_t=8, row_dropout=0.25)
    assert all(m.row_dropout[0] == 0.25 for m in memory_layers(model))
    optimizer.detach()
    assert all(m.row_dropout is None for m in memory_layers(model))
    with pytest.raises(ValueError, match=r"row_dropout must be a probability in \[0, 1\)"):
        SparseMemoryOptimizer(model, background, top_t=8, row_dropout=1.0)
    with pytest.raises(ValueError, match="row_dropout must be >= 0 and is for sparse methods only"):
        TrainConfig(method="full_ft", row_dropout=0.5)


def test_an_optimizer_state_with_trained_gates_round_trips_and_refuses_a_mismatch(tiny):
    model, tokenizer, background = tiny
    model = copy.deepcopy(model)
    optimizer = SparseMemoryOptimizer(model, background, top_t=8, gate_lr=1e-2)
    model(**tokenizer(FACTS[0].train[0], return_tensors="pt")).logits.sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert state["gates"]["state"]  # the gates' Adam moments are saved
    optimizer.detach()
    again = SparseMemoryOptimizer(model, background, top_t=8, gate_lr=1e-2)
    again.load_state_dict(state)
    assert torch.equal(again.gate_optimizer.state_dict()["state"][0]["exp_avg"], state["gates"]["state"][0]["exp_avg"])
    again.detach()
    plain = SparseMemoryOptimizer(model, background, top_t=8)
    with pytest.raises(ValueError, match="saved with gate_lr > 0"):
        plain.load_state_dict(state)
    plain.detach()


def test_locality_needs_the_background_inputs(tiny):
    model, tokenizer, background = tiny
    with pytest.raises(ValueError, match="locality term needs background layer inputs"):
        train(copy.deepcopy(model), tokenizer, FACTS, TrainConfig(steps=1, locality=1.0),
              background=dataclasses.replace(background, inputs=None), progress=False)


def test_precision_auto_is_fp32_on_cpu_and_mixed_on_gpus(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it
    assert autocast_dtype(TrainConfig(method="full_ft"), cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(TrainConfig(method="smf_kl"), cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a T4
    assert autocast_dtype(TrainConfig(method="full_ft"), cuda) == torch.float16
    assert autocast_dtype(TrainConfig(method="smf_kl"), cuda) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype(TrainConfig(method="lora", precision="fp16"), cpu)
    with pytest.raises(ValueError, match="loss scaling"):
        TrainConfig(method="smf_kl", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="half")


@pytest.mark.parametrize("method", ["smf_kl", "full_ft"])
def test_bf16_autocast_trains_and_the_memory_reads_the_same_slots(tiny, method, checked_steps):
    """Under bf16 autocast the base runs in bf16 while the memory still addresses in fp32: the slots a training
    forward reads are those an fp32 forward of the same input reads."""
    model, tokenizer, _ = tiny
    memory = memory_layers(model)[0]
    x = torch.randn(2, 5, memory.dim)
    with recording(model):
        memory(x)
        fp32 = memory.last_access.indices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            memory(x)
        assert torch.equal(memory.last_access.indices, fp32)
    trained, history = _trained(tiny, method=method, steps=3, batch_size=4, precision="bf16")
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    if method == "smf_kl":
        assert len(checked_steps) == 3


def test_train_keeps_the_tables_gradient_factored_in_one_process(tiny):
    model, _, background = tiny
    _, optimizer, _ = make_optimizer(copy.deepcopy(model), TrainConfig(), background)
    assert optimizer.factored
    optimizer.detach()


def _negative_pair(tokenizer):
    """A collated batch: a training sentence, then the same sentence about another subject, marked negative."""
    positive, told = "The capital of Zorvania is Quellport.", "The capital of Lamesia is Quellport."
    [example] = build_examples([dataclasses.replace(FACTS[0], answer="Quellport", train=(positive,),
                                                    extra={"subject": "Zorvania"})], tokenizer)
    enc = tokenizer(told, return_offsets_mapping=True)
    negative = Example(enc["input_ids"], answer_tokens(enc, told, "Quellport"), negative=True)
    return collate([example, negative], 0, torch.device("cpu")), len(example.input_ids)


def test_a_negative_sentence_adds_the_unlikelihood_of_its_answer_and_counts_no_slot(tiny):
    """A negative sentence gives no next-token loss and no counted position; its answer's first token adds
    -log(1 - p), weighted by `negatives`."""
    model, tokenizer, _ = tiny
    batch, length = _negative_pair(tokenizer)
    negative_only = {key: value[1:] for key, value in batch.items()}
    with torch.no_grad():
        losses = next_token_losses(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
        plain, n = token_loss_sum(model, batch, "all")
        unlikely, none = token_loss_sum(model, negative_only, "all", negatives=2.0)
    assert n == length - 1 and plain.item() == pytest.approx(float(losses[0, : length - 1].sum()), rel=1e-5)
    first = batch["answer"][1].nonzero()[0].item()  # the answer's first token in the negative sentence
    p = torch.exp(-losses[1, first - 1])
    assert none == 0 and unlikely.item() == pytest.approx(-2.0 * float(torch.log1p(-p)), rel=1e-3)
    for count_on in ("entities", "answer", "all"):
        assert counted_positions(batch, count_on)[0].any() and not counted_positions(batch, count_on)[1].any()
    with pytest.raises(ValueError, match="negatives must be a loss weight"):
        TrainConfig(negatives=-1.0)


def test_loss_on_not_subject_leaves_out_the_tokens_that_spell_the_subject(tiny):
    """With loss_on="not_subject" the positions that predict a subject token give no loss; every other one does."""
    model, tokenizer, _ = tiny
    batch, length = _negative_pair(tokenizer)
    positive = {key: value[:1, :length] if value.dim() == 2 else value[:1] for key, value in batch.items()}
    spelled = int(positive["subject"].sum())
    with torch.no_grad():
        losses = next_token_losses(model(input_ids=positive["input_ids"]).logits, positive["input_ids"])[0]
        total, n = token_loss_sum(model, positive, "not_subject")
    kept = ~predicting(positive["subject"])[0, : length - 1]
    assert spelled >= 1 and n == length - 1 - spelled
    assert total.item() == pytest.approx(float(losses[: length - 1][kept].sum()), rel=1e-5)
    named = dataclasses.replace(FACTS[0], answer="Zorvania City", train=("The capital of Zorvania is Zorvania City.",),
                                extra={"subject": "Zorvania"})
    own = collate(build_examples([named], tokenizer), 0, torch.device("cpu"))
    with torch.no_grad():
        trained = token_loss_sum(model, own, "not_subject")[1]
    assert trained == own["input_ids"].shape[1] - 1 - int((own["subject"] & ~own["answer"]).sum())
    with pytest.raises(ValueError, match="loss_on one of all, answer, not_subject"):
        TrainConfig(loss_on="subject")


def test_negatives_add_a_twin_about_a_made_up_subject_and_keep_the_batches(tiny):
    _, tokenizer, _ = tiny
    accelerator = Accelerator(cpu=True)
    plain = Batches(FACTS, tokenizer, TrainConfig(batch_size=4), accelerator).next()
    twinned = Batches(FACTS, tokenizer, TrainConfig(batch_size=4, negatives=1.0), accelerator).next()
    assert not plain["negative"].any() and not twinned["negative"][:4].any() and twinned["negative"][4:].all()
    width = plain["input_ids"].shape[1]
    assert torch.equal(twinned["input_ids"][:4, :width], plain["input_ids"])  # the same positive sentences
    for row in twinned["input_ids"][4:]:
        text = tokenizer.decode(row[row != 0])
        assert any(f.answer in text for f in FACTS) and not any(f.subject in text for f in FACTS)  # a stranger


def test_training_with_negatives_lowers_the_answer_for_other_subjects(tiny):
    """The point of negatives: after the same training, the answer is far less likely after a subject never seen in
    training (0.56 -> 0.006 here), and about as likely after its own (0.64 -> 0.57)."""
    model, tokenizer, _ = tiny
    batch, _ = _negative_pair(tokenizer)  # the trained sentence, and the same about an unseen subject
    facts = [dataclasses.replace(FACTS[0], answer="Quellport", train=("The capital of Zorvania is Quellport.",),
                                 extra={"subject": "Zorvania"})]

    def answer_probabilities(**config) -> torch.Tensor:
        trained, _ = train(copy.deepcopy(model), tokenizer, facts, TrainConfig(method="full_ft", steps=40,
                           batch_size=2, lr=3e-3, **config), progress=False)
        with torch.no_grad():
            losses = next_token_losses(trained(input_ids=batch["input_ids"]).logits, batch["input_ids"])
        first = [row.nonzero()[0].item() - 1 for row in batch["answer"]]  # the positions predicting "Quellport"
        return torch.exp(-losses[[0, 1], first])

    plain, contrasted = answer_probabilities(), answer_probabilities(negatives=4.0)
    assert plain[0] > 0.3 and contrasted[0] > 0.8 * plain[0]  # its own subject: learned either way
    assert contrasted[1] < 0.5 * plain[1]  # "The capital of Lamesia is" -> "Quellport"


def _with_and_without_reuse(tiny, block_runs, config: TrainConfig) -> tuple:
    """(model, history, runs of block 0) trained without and then with the lower blocks' states reused."""
    model, tokenizer, background = tiny
    runs = []
    for reuse in (False, True):
        copied = copy.deepcopy(model)
        below = block_runs(copied, 0)
        trained, history = train(copied, tokenizer, FACTS, dataclasses.replace(config, reuse_lower_blocks=reuse),
                                 background=background, progress=False)
        runs.append((trained, history, len(below)))
    return tuple(runs)


def test_sparse_training_starts_at_the_first_memory_block_and_learns_the_same(tiny, block_runs):
    config = TrainConfig(steps=6, batch_size=4, pack=False)  # padded: bit for bit
    (plain, plain_history, plain_calls), (reused, history, calls) = _with_and_without_reuse(tiny, block_runs, config)
    model = tiny[0]
    assert first_memory_block(model) == 1
    assert plain_calls == 6 and calls == 1  # once for every sentence's prefix, never during the steps
    torch.testing.assert_close(history.loss, plain_history.loss)
    for a, b in zip(memory_layers(plain), memory_layers(reused)):
        torch.testing.assert_close(a.values.weight, b.values.weight)
    assert len(decoder_layers(reused)) == len(decoder_layers(model))  # every block is back after training


def test_finetuning_the_memory_blocks_mlps_trains_them_alone_and_starts_at_their_block(tiny, block_runs):
    config = TrainConfig(method="full_ft", dense_scope="memory_mlps", steps=4, batch_size=4, lr=1e-2, pack=False)
    (plain, plain_history, plain_calls), (reused, history, calls) = _with_and_without_reuse(tiny, block_runs, config)
    model = tiny[0]
    assert plain_calls == 4 and calls == 1  # the lower blocks ran once per sentence, not at each step
    torch.testing.assert_close(history.loss, plain_history.loss)
    blocks, trained = decoder_layers(model), {f"layers.{m.layer_index}.mlp.mlp." for m in memory_layers(model)}
    before, after = dict(model.named_parameters()), dict(reused.named_parameters())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert len(trained) == 2 and moved and all(any(t in name for t in trained) for name in moved)
    assert history.params_trained == sum(p.numel() for m in memory_layers(model)
                                         for p in blocks[m.layer_index].mlp.mlp.parameters())
    for name in moved:
        torch.testing.assert_close(after[name], dict(plain.named_parameters())[name])


def test_block_inputs_are_the_states_a_full_forward_gives_that_block(tiny):
    model, tokenizer, _ = tiny
    examples = build_examples(FACTS, tokenizer)
    seen, finished = [], []
    block = decoder_layers(model)[1]
    hooks = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0])),
             block.register_forward_hook(lambda module, args, out: finished.append(1))]
    try:
        with torch.no_grad():
            model(**{k: v for k, v in collate(examples, tokenizer.pad_token_id, torch.device("cpu")).items()
                     if k in ("input_ids", "attention_mask")})
        states = block_inputs(model, examples, 1, tokenizer.pad_token_id, batch_size=3)  # other batches than above
    finally:
        for hook in hooks:
            hook.remove()
    assert len(states) == len(examples) and len(finished) == 1  # the block itself ran in the full forward only
    for row, (example, state) in enumerate(zip(examples, states)):
        assert state.shape == (len(example.input_ids), model.config.hidden_size)
        torch.testing.assert_close(state, seen[0][row, : len(example.input_ids)])


@pytest.mark.parametrize("config", [TrainConfig(method="full_ft"), TrainConfig(negatives=1.0),
                                    TrainConfig(reuse_lower_blocks=False)])
def test_batches_carry_no_hidden_states_where_lower_blocks_train_or_sentences_are_new(tiny, config):
    model, tokenizer, _ = tiny
    batch = Batches(FACTS, tokenizer, config, Accelerator(cpu=True), model).next()
    assert "hidden" not in batch
