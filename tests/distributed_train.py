"""Train the tiny model with SMF-KL and save its memory; run under `accelerate launch` by test_distributed.py."""

import sys

import torch

from smf_lib.data import load_facts
from smf_lib.models import load_base_model
from smf_lib.pipeline import prepare_memory
from smf_lib.profiles import get_profile
from smf_lib.retrofit import save_memory
from smf_lib.training import TrainConfig, train


def main(out: str) -> None:
    torch.use_deterministic_algorithms(True)
    model, tokenizer = load_base_model("tiny")
    texts = [f.train[0] for f in load_facts()[50:80]]
    background = prepare_memory(model, tokenizer, texts, get_profile("tiny").memory, progress=False)
    # Row SGD: its update is linear in the gradient. Adam's first step, lr * g/|g|, turns a rounding-sized
    # gradient into a full step of either sign, so one process and two could disagree by 2 * lr.
    # Slots counted at every token. Counted only at the answers of 4 facts, the scores rest on few reads: by step 4
    # the rounding differences of another summation order, grown by three steps of training, swap one row at the
    # top-t boundary (the selections agree exactly until then). Both modes reduce the counts the same way.
    config = TrainConfig(steps=4, batch_size=8, top_t=16, optimizer="sgd", lr=1.0, count_on="all")
    model, history = train(model, tokenizer, load_facts(limit=4), config, background=background, progress=False)
    from accelerate import PartialState

    if PartialState().is_main_process:
        save_memory(model, out)
        print("losses", history.loss)


if __name__ == "__main__":
    main(sys.argv[1])
