"""Quality regression of the shipped tiny model on identities it never saw in training.

End to end through the real code path (VAE, text encoder, identity branch, KV cache, sampler):
if the identity branch, its LoRA, the conditional RoPE mapping or the cache breaks, the
reference stops helping and these fail. Tolerances, not bitwise values: other machines round
differently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from standin.pipeline import WAN_NEGATIVE_PROMPT, StandInPipeline
from standin.training.quality import retrieval_accuracy, sample_videos, subject_losses
from standin.training.tiny_recipe import SyntheticLatents, synthetic_clips, tiny_identities

NUM_IDENTITIES = 16  # held-out identities in the test; chance of top-1 retrieval is 1/16


@pytest.fixture(scope="module")
def pipe() -> StandInPipeline:
    return StandInPipeline.from_preset("tiny", device="cpu")


@pytest.fixture(scope="module")
def clips(pipe: StandInPipeline) -> list:
    _, held_out = tiny_identities()
    # one clip per held-out identity, prompts cycling through the vocabulary
    return synthetic_clips(held_out[:NUM_IDENTITIES], 1, pipe.preset, seed=7)


@pytest.fixture(scope="module")
def threads():
    # Tiny ops: one thread is faster than two fighting over a loaded machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_right_reference_lowers_the_subject_loss_and_a_wrong_one_raises_it(
    pipe: StandInPipeline, clips: list, threads: None
) -> None:
    data = SyntheticLatents(clips, pipe.vae, pipe.text_encoder, pipe.preset, WAN_NEGATIVE_PROMPT)
    loss = subject_losses(pipe, data, shift_by=1, seed=0)
    assert loss["correct"] < 0.85 * loss["none"], loss
    assert loss["none"] < loss["wrong"], loss


def test_samples_keep_the_identity_of_the_reference_and_a_swapped_one_swaps_it(
    pipe: StandInPipeline, clips: list, threads: None
) -> None:
    refs = [c.reference for c in clips]
    truth = list(range(len(clips)))
    right = retrieval_accuracy(sample_videos(pipe, clips, refs, seed=1), clips, refs, truth)
    swapped = refs[1:] + refs[:1]
    wrong = retrieval_accuracy(sample_videos(pipe, clips, swapped, seed=1), clips, refs, truth)
    chance = 1 / len(clips)
    assert right >= 4 * chance, (right, wrong)
    assert wrong < right - 2 * chance, (right, wrong)


def test_cached_and_uncached_sampling_agree_across_consecutive_requests(
    pipe: StandInPipeline, clips: list, threads: None
) -> None:
    # Two requests in a row with different faces: a cache that outlives its request shows here.
    for pair in (clips[:2], clips[2:4]):
        refs = [c.reference for c in pair]
        cached = sample_videos(pipe, pair, refs, seed=3).astype(np.int16)
        uncached = sample_videos(pipe, pair, refs, seed=3, reuse_identity_cache=False).astype(np.int16)
        assert np.abs(cached - uncached).max() <= 1
