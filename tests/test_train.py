"""scripts/train.py: tokenizer ids, batching, exact resume, and function-preserving growth."""
import json

import pytest
import torch

import minibild
from minibild.tokenizer import EOS_ID, PAD_ID, UNK_ID
from minibild.weights import from_hf
from train import PRESETS, grow_from, init_weights, main, make_batches

WORDS_ES = "el la de que y en un una es por con para los las dios señor tierra cielo pueblo casa".split()
WORDS_EN = "the of that and in a is by with for god lord earth heaven people house".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny synthetic parallel corpus and a sentencepiece model trained on it by the script."""
    import random

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, n in (("train", 120), ("dev", 12)):
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                k = rng.randint(2, 8)
                f.write(json.dumps({"source": " ".join(rng.choice(WORDS_ES) for _ in range(k)),
                                    "reference": " ".join(rng.choice(WORDS_EN) for _ in range(k))}) + "\n")
    main(["tokenizer", "--data", str(root), "--out", str(root / "spiece.model"), "--vocab-size", "60"])
    return root


def train_args(corpus, out, *extra):
    return ["model", "--preset", "tiny", "--data", str(corpus), "--tokenizer", str(corpus / "spiece.model"),
            "--out", str(out), "--max-tokens", "200", "--warmup", "5", "--log-every", "1000", "--device", "cpu",
            *extra]


def test_tokenizer_has_t5_special_ids(corpus):
    tok = minibild.Tokenizer(corpus / "spiece.model")
    assert (tok.sp.pad_id(), tok.sp.eos_id(), tok.sp.unk_id(), tok.sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, -1)
    ids = tok.encode("dios y tierra")
    assert ids[-1] == EOS_ID and PAD_ID not in ids
    assert tok.decode(ids + [PAD_ID, PAD_ID]) == "dios y tierra"


def test_batches_cover_every_pair_once_within_the_token_budget():
    pairs = [([1] * (3 + i % 7), [1] * (2 + i % 5)) for i in range(50)]
    batches = make_batches(pairs, max_tokens=40)
    assert sorted(i for b in batches for i in b) == list(range(50))
    for b in batches:
        assert len(b) * max(len(pairs[i][0]) + len(pairs[i][1]) for i in b) <= 40


def test_resume_mid_epoch_is_exact(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "straight", "--epochs", "2"))
    main(train_args(corpus, tmp_path / "resumed", "--epochs", "2", "--max-steps", "7"))  # stops mid-epoch
    main(train_args(corpus, tmp_path / "resumed", "--epochs", "2"))  # resumes from checkpoint.pt
    a, b = (from_hf(tmp_path / name / "hf").state_dict() for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_eta_counts_down_to_max_steps(corpus, tmp_path, capsys):
    main(train_args(corpus, tmp_path / "run", "--epochs", "1000", "--max-steps", "4", "--log-every", "2"))
    lines = [line for line in capsys.readouterr().err.splitlines() if " ETA " in line]
    etas = [float(line.split(" ETA ")[1].split()[0]) for line in lines]  # minutes
    # 1000 epochs alone would predict minutes to hours; the run stops after 4 steps of well under a second.
    assert len(etas) == 2 and etas[0] < 0.5 and etas[1] == 0.0, lines


def test_running_again_at_max_steps_trains_no_further(corpus, tmp_path):
    args = train_args(corpus, tmp_path / "run", "--epochs", "1000", "--max-steps", "3")
    main(args)
    first = from_hf(tmp_path / "run" / "hf").state_dict()
    main(args)  # resumes at step 3: nothing left to do
    second = from_hf(tmp_path / "run" / "hf").state_dict()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_refuses_other_settings(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--epochs", "1", "--max-steps", "2"))
    with pytest.raises(SystemExit, match="other settings"):
        main(train_args(corpus, tmp_path / "run", "--epochs", "1", "--lr", "0.01"))


def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(corpus, tmp_path):
    from transformers import T5ForConditionalGeneration

    main(train_args(corpus, tmp_path / "run", "--epochs", "1"))
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "run" / "hf").eval()
    ours = from_hf(tmp_path / "run" / "hf")
    src, dec = torch.tensor([[5, 9, 13, 1]]), torch.tensor([[0, 7, 11]])
    with torch.no_grad():
        expected = hf(input_ids=src, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours(src, dec), expected, rtol=1e-5, atol=1e-5)


def test_growth_preserves_the_function():
    torch.manual_seed(0)
    small_config = minibild.T5Config(vocab_size=50, **PRESETS["tiny"])
    small = minibild.T5(small_config)
    init_weights(small, small_config)
    big_config = minibild.T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=96, num_layers=2,
                                   num_decoder_layers=3)
    big = minibild.T5(big_config)
    init_weights(big, big_config)
    grow_from(big, small)
    src, dec = torch.randint(2, 50, (2, 9)), torch.randint(2, 50, (2, 6))
    small.eval(), big.eval()
    with torch.no_grad():
        torch.testing.assert_close(big(src, dec), small(src, dec), rtol=0, atol=1e-6)
        assert any(p.abs().sum() > 0 for n, p in big.named_parameters() if "layers.2." in n)  # trainable, not empty


def test_early_exit_training_option(corpus, tmp_path):
    main(train_args(corpus, tmp_path / "run", "--epochs", "1", "--max-steps", "2", "--exit-layer", "1"))
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match=r"--exit-layer must be in \[1, 1\]"):
        main(train_args(corpus, tmp_path / "bad", "--epochs", "1", "--exit-layer", "2"))
