"""What only a CUDA GPU can check (skipped without one; scripts/gpu_report.sh runs these first): minibild's T5 in
float32, float16 and bfloat16 on the GPU against transformers on the same GPU, BiLD's exactness on the GPU (batched
too), and the shipped pair in every dtype."""
import copy
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_greedy, hf_logits, make_batch, rel_diff
from tiny_models import sharp_random_t5

import minibild
from minibild import bild, greedy
from minibild.batch import generate_batch, right_pad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_report.sh)")
CUDA = torch.device("cuda")
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# --- the model against transformers, on the GPU --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_on_cuda_are_as_accurate_as_transformers(checkpoint, dtype):
    # The reference is transformers in float32 on the CPU. The bar is 1e-5 relative (float32's bar on the CPU) or
    # twice transformers' own error in this dtype on this GPU, whichever is larger: a float16 or bfloat16 result
    # keeps ~3 or ~2 digits, and the random weights amplify rounding through the layers.
    input_ids, mask, decoder_ids = make_batch(checkpoint.config["vocab_size"])
    exact = hf_logits(checkpoint.hf(torch.float32), input_ids, mask, decoder_ids).to(CUDA)
    input_ids, mask, decoder_ids = input_ids.to(CUDA), mask.to(CUDA), decoder_ids.to(CUDA)
    theirs = hf_logits(checkpoint.hf(dtype).to(CUDA), input_ids, mask, decoder_ids).float()
    with torch.no_grad():
        ours = minibild.load(checkpoint.minibild_dir, device=CUDA, dtype=dtype)(input_ids, decoder_ids, mask)
    assert ours.dtype == dtype and ours.device.type == "cuda" and torch.isfinite(ours).all()
    ours = ours.float()
    assert rel_diff(exact, ours) <= max(1e-5, 2 * rel_diff(exact, theirs))
    # BiLD reads probabilities, not only the argmax.
    p_exact, p_theirs, p_ours = exact.softmax(-1), theirs.softmax(-1), ours.softmax(-1)
    assert rel_diff(p_exact, p_ours) <= max(1e-5, 2 * rel_diff(p_exact, p_theirs))


def test_greedy_on_cuda_matches_transformers(checkpoint):
    input_ids, mask, _ = make_batch(checkpoint.config["vocab_size"], seed=1, source_lengths=(20, 13, 6, 9, 17))
    input_ids, mask = input_ids.to(CUDA), mask.to(CUDA)
    expected = hf_greedy(checkpoint.hf(torch.float32).to(CUDA), input_ids, mask, 12)
    assert greedy(minibild.load(checkpoint.minibild_dir, device=CUDA), input_ids, 12, mask) == expected


# --- BiLD on the GPU -------------------------------------------------------------------------------------------

def tiny_pair():
    """A random float64 pair whose small model often disagrees with the large one (rollbacks happen)."""
    large = sharp_random_t5(minibild.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=2,
                                              num_decoder_layers=3), seed=0).double()
    small = sharp_random_t5(minibild.T5Config(vocab_size=64, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=1,
                                              num_decoder_layers=1), seed=1).double()
    return large, small


def decisions(result):
    return result.tokens, [(step.model, step.start, step.fed, step.decision) for step in result.trace]


def test_bild_on_cuda_equals_bild_on_cpu_and_stays_exact():
    """float64, so that a k-token and k one-token forwards cannot flip a near-tie: on the GPU, rollback 0,
    speculative decoding and early-exit BiLD give large greedy's tokens, and every run makes the same decisions as
    on the CPU."""
    cpu = tiny_pair()
    gpu = tuple(copy.deepcopy(m).to(CUDA) for m in cpu)
    rollbacks = 0
    for seed in range(8):
        src = torch.randint(2, 64, (1, 3 + seed), generator=torch.Generator().manual_seed(seed))
        for fallback, rollback in [(0.6, 0.0), (0.6, 5.0), (0.9, 1.0)]:
            settings = dict(fallback_threshold=fallback, rollback_threshold=rollback, max_small_steps=4,
                            max_new_tokens=20)
            on_cpu = bild.generate(*cpu, src, **settings)
            on_gpu = bild.generate(*gpu, src.to(CUDA), **settings)
            assert decisions(on_gpu) == decisions(on_cpu)
            rollbacks += on_gpu.stats.rollbacks
        expected = greedy(gpu[0], src.to(CUDA), 20)[0]
        exact = dict(fallback_threshold=0.6, rollback_threshold=0.0, max_small_steps=4, max_new_tokens=20)
        assert bild.generate(*gpu, src.to(CUDA), **exact).tokens == expected
        assert bild.speculative(*gpu, src.to(CUDA), k=3, max_new_tokens=20).tokens == expected
        assert bild.generate(gpu[0], minibild.EarlyExit(gpu[0], 1), src.to(CUDA), **exact).tokens == expected
    assert rollbacks > 0  # the comparison covered the rollback path


def test_generate_batch_on_cuda_equals_bild_on_cpu():
    """float64: each row of a batch decoded on the GPU (ragged caches, rows of different lengths) makes the
    decisions bild.generate makes on that row alone on the CPU."""
    cpu = tiny_pair()
    gpu = tuple(copy.deepcopy(m).to(CUDA) for m in cpu)
    sources = [torch.randint(2, 64, (3 + seed,), generator=torch.Generator().manual_seed(seed)) for seed in range(6)]
    rollbacks = 0
    for fallback, rollback in [(0.6, 0.0), (0.6, 5.0), (0.9, 1.0)]:
        settings = dict(fallback_threshold=fallback, rollback_threshold=rollback, max_small_steps=4,
                        max_new_tokens=20)
        results = generate_batch(*gpu, *right_pad(sources, 0, CUDA), **settings)
        assert [decisions(r) for r in results] == [decisions(bild.generate(*cpu, src[None], **settings))
                                                   for src in sources]
        rollbacks += sum(r.stats.rollbacks for r in results)
    assert rollbacks > 0


# --- the shipped pair ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shipped_pair_translates_on_cuda(dtype):
    tok = minibild.Tokenizer(WEIGHTS / "large" / "spiece.model")
    large = minibild.load(WEIGHTS / "large", device=CUDA, dtype=dtype)
    small = minibild.load(WEIGHTS / "small", device=CUDA, dtype=dtype)
    src = torch.tensor([tok.encode("Jesús lloró.")], device=CUDA)
    for partner in (small, minibild.EarlyExit(large, 2)):
        result = bild.generate(large, partner, src)
        assert result.tokens[-1] == large.config.eos_token_id
        assert all(0 < step.prob <= 1 for step in result.trace if step.model == "small")
        if dtype == torch.float32:  # the CPU's translation (README's trace)
            assert tok.decode(result.tokens) == "Jesus wept."
