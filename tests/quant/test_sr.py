"""Device-side stochastic-rounding state: keys from [seed, step], advanced in place."""

import pytest
import torch

from hf_nvfp4.kernels import is_triton_available
from hf_nvfp4.numerics import quantize
from hf_nvfp4.numerics.rng import (
    counter_uniform,
    derive_keys,
    draw_seed,
    generator_keys,
    keyed_uniform,
    seed_key,
    split_generator,
)
from hf_nvfp4.quant.sr import advance_keys, new_state

STATES = [(123456789012345, 6), (2**62 - 5, 2**33 + 6), (0, 0), (7, 2**32 - 1)]


def test_keyed_uniform_equals_counter_uniform_of_the_seed():
    for seed in (0, 1, 2**31 - 2, 123456):
        key = torch.tensor(seed_key(seed))
        assert torch.equal(keyed_uniform(key, (7, 9), "cpu"), counter_uniform(seed, (7, 9), "cpu"))


def test_generator_keys_draw_what_split_generators_draw():
    keys = generator_keys(torch.Generator().manual_seed(5))
    children = split_generator(torch.Generator().manual_seed(5))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for key, child in zip(keys, children, strict=True):
        a = quantize(x, rounding="stochastic", sr_key=key)
        b = quantize(x, rounding="stochastic", generator=child)
        assert torch.equal(a.data, b.data)
    assert keys.dtype == torch.int32 and keys.tolist() == [
        k - 2**32 if k >= 2**31 else k for k in (seed_key(draw_seed(c)) for c in
                                                 split_generator(torch.Generator().manual_seed(5)))
    ]


@pytest.mark.parametrize("seed, step", STATES)
def test_advance_keys_increments_and_derives(seed, step):
    state = new_state(seed)
    state[1] = step
    keys = advance_keys(state, 3)
    assert state.tolist() == [seed, step + 1]
    assert torch.equal(keys, derive_keys(torch.tensor([seed, step + 1]), 3))
    assert keys.dtype == torch.int32 and keys.shape == (2,)


def test_keys_differ_by_step_rank_and_copy():
    base = derive_keys(torch.tensor([11, 1]), 0)
    assert base[0] != base[1]
    assert not torch.equal(base, derive_keys(torch.tensor([11, 2]), 0))
    assert not torch.equal(base, derive_keys(torch.tensor([11, 1]), 1))
    assert not torch.equal(base, derive_keys(torch.tensor([12, 1]), 0))


@pytest.mark.skipif(not is_triton_available()[0], reason=is_triton_available()[1])
@pytest.mark.parametrize("seed, step", STATES)
@pytest.mark.parametrize("rank", [0, 1, 2**20 + 3])
def test_triton_kernel_equals_reference(seed, step, rank):
    from hf_nvfp4.kernels.sr_keys import advance_keys_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    state = torch.tensor([seed, step], device=dev)
    keys = advance_keys_triton(state, rank, 2)
    assert state.tolist() == [seed, step + 1]
    assert keys.cpu().tolist() == derive_keys(torch.tensor([seed, step + 1]), rank).tolist()
