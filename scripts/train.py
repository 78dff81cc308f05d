"""Train the demo pair: a sentencepiece tokenizer, then a large and a small T5 built with minibild's model.

    python scripts/train.py tokenizer --data data --out runs/spiece.model
    python scripts/train.py model --preset large --data data --tokenizer runs/spiece.model --out runs/large
    python scripts/convert_hf_t5.py runs/large/hf weights/large --dtype float16

`model` trains with teacher forcing, label smoothing, dropout, a warm-up then inverse-square-root learning
rate, and gradient clipping, from a fixed seed. It checkpoints to OUT/checkpoint.pt regularly and resumes
from it exactly (same data order, same dropout masks) when run again with the same arguments, so a long
CPU run can be split across sittings. At the end it writes OUT/hf, a Hugging Face T5 checkpoint folder.
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import minibild  # noqa: E402
from minibild.progress import progress  # noqa: E402
from minibild.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer  # noqa: E402
from minibild.weights import from_hf, save_hf  # noqa: E402

# Model shapes of the demo pair (t5 v1.0 style: relu, tied embeddings). The large decoder costs about
# 4.5x the small one per token (parameters read per step), like the paper's pairs in spirit.
PRESETS = {
    "large": dict(d_model=320, d_kv=64, num_heads=5, d_ff=1280, num_layers=5, num_decoder_layers=6),
    "small": dict(d_model=192, d_kv=64, num_heads=3, d_ff=768, num_layers=3, num_decoder_layers=2),
    # Grown from a trained "small" (--init-from): same width, twice the heads, wider feed-forward, 4x the
    # decoder layers; the grown model starts out computing exactly what the small one does.
    "grown": dict(d_model=192, d_kv=64, num_heads=6, d_ff=2048, num_layers=4, num_decoder_layers=8),
    "tiny": dict(d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1, num_decoder_layers=2),  # for tests
}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        sys.exit(f"{path}: not found; run `python scripts/prepare_data.py` first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        sys.exit(f"{path}: no examples")
    return rows


# --- tokenizer ---------------------------------------------------------------------------------------

def train_tokenizer(args):
    import sentencepiece as spm

    rows = read_jsonl(Path(args.data) / "train.jsonl")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.with_suffix(".txt")
    # One model for both languages, so the two models of a pair and both sides of the data share ids.
    text.write_text("".join(f"{r['source']}\n{r['reference']}\n" for r in rows), encoding="utf-8")
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(out.with_suffix("")), vocab_size=args.vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1, seed_sentencepiece_size=1_000_000,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,  # T5's special ids; T5 uses no BOS
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    text.unlink()
    print(f"wrote {out} ({Tokenizer(out).vocab_size} pieces)", file=sys.stderr)


# --- data ----------------------------------------------------------------------------------------------

def tokenize(rows, tok: Tokenizer, max_length: int, name: str):
    """(source ids + EOS, target ids + EOS) pairs; pairs longer than max_length are dropped, and counted."""
    pairs = [(tok.encode(r["source"]), tok.encode(r["reference"])) for r in rows]
    kept = [p for p in pairs if max(len(p[0]), len(p[1])) <= max_length]
    if len(kept) < len(pairs):
        print(f"{name}: dropped {len(pairs) - len(kept)} of {len(pairs)} pairs longer than {max_length} tokens",
              file=sys.stderr)
    return kept


def make_batches(pairs, max_tokens: int) -> list[list[int]]:
    """Group pairs of similar length so that a padded batch holds at most max_tokens source+target tokens."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1]), i))
    batches, batch, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, len(pairs[i][0]) + len(pairs[i][1]))
        if batch and longest_if_added * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest_if_added = [], len(pairs[i][0]) + len(pairs[i][1])
        batch.append(i)
        longest = longest_if_added
    return batches + [batch] if batch else batches


def pad(seqs, value, device):
    """Right-pad lists of ids to one (B, max length) tensor."""
    width = max(map(len, seqs))
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)


def collate(pairs, batch, decoder_start_id: int, device):
    """Padded source, mask, teacher-forcing decoder input (target shifted right) and labels (-100 on padding)."""
    sources = [pairs[i][0] for i in batch]
    targets = [pairs[i][1] for i in batch]
    input_ids = pad(sources, PAD_ID, device)
    return dict(input_ids=input_ids, attention_mask=(input_ids != PAD_ID).long(),
                decoder_input_ids=pad([[decoder_start_id] + t[:-1] for t in targets], PAD_ID, device),
                labels=pad(targets, -100, device))


# --- training ------------------------------------------------------------------------------------------

def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then inverse square root: no end date, so training can stop at any step."""
    step = max(step, 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def loss_fn(model, batch, label_smoothing: float, exit_layer: int = 0, exit_weight: float = 0.0):
    """Teacher-forced cross-entropy; with exit_layer k, plus exit_weight times the cross-entropy of the
    early-exit model (the first k decoder layers, then the final norm and LM head: minibild.EarlyExit)."""
    def cross_entropy(logits):  # (B, T, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast: loss in float32
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)

    mask, T = batch["attention_mask"], batch["decoder_input_ids"].shape[1]
    encoded = model.encode(batch["input_ids"], mask)
    if not exit_layer:
        return cross_entropy(model.decode(batch["decoder_input_ids"], model.new_cache(encoded, mask, T)))
    # On a cache shared with the early-exit model, the large model's pass keeps the exit layer's output.
    early_exit = minibild.EarlyExit(model, exit_layer)
    cache = early_exit.new_shared_cache(encoded, mask, T)
    loss = cross_entropy(early_exit.shared_large.decode(batch["decoder_input_ids"], cache))
    return loss + exit_weight * cross_entropy(early_exit.head(cache.exit_hidden))


@torch.no_grad()
def dev_loss(model, pairs, batches, decoder_start_id, device, autocast) -> float:
    """Token-level cross-entropy (no smoothing) on the dev split; `model` is in eval mode."""
    total, count = 0.0, 0
    for batch in batches:
        b = collate(pairs, batch, decoder_start_id, device)
        with autocast:
            n = int((b["labels"] != -100).sum())
            total += float(loss_fn(model, b, 0.0)) * n
            count += n
    return total / count


@torch.no_grad()
def update_average(average, model, decay: float):
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)


def save_checkpoint(path: Path, model, average, optimizer, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "average": average.state_dict(),
                "optimizer": optimizer.state_dict(), **state,
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def train_model(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    tok = Tokenizer(args.tokenizer)
    config = minibild.T5Config(vocab_size=tok.vocab_size, dropout_rate=args.dropout, **PRESETS[args.preset])
    if args.exit_layer and not 1 <= args.exit_layer < config.num_decoder_layers:
        sys.exit(f"--exit-layer must be in [1, {config.num_decoder_layers - 1}] for the {args.preset} preset's "
                 f"{config.num_decoder_layers} decoder layers, got {args.exit_layer}")
    # What decides the trained weights; the rest (when to stop, where, logging) may change between sittings.
    settings = {k: v for k, v in vars(args).items()
                if k not in ("func", "time_budget", "device", "epochs", "max_steps", "log_every",
                             "checkpoint_minutes", "export_dtype", "bleu", "bleu_limit")}
    checkpoint_path = out / "checkpoint.pt"
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0, "settings": settings}

    torch.manual_seed(args.seed)
    model = minibild.T5(config)
    init_weights(model, config)
    if args.init_from:
        grow_from(model, from_hf(args.init_from))
    model.to(device).train()
    # An exponential moving average of the weights is what gets evaluated and exported: it smooths out
    # the noise of the last steps, much like annealing the learning rate, without fixing an end date.
    average = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if saved["settings"] != settings:
            sys.exit(f"{checkpoint_path}: was made with other settings; use the same arguments or another --out.\n"
                     f"  saved: {saved['settings']}\n  now:   {settings}")
        model.load_state_dict(saved["model"])
        average.load_state_dict(saved["average"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["cpu_rng"].cpu())
        if saved["cuda_rng"] and device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda_rng"]])
        state = {k: saved[k] for k in state}
        print(f"resumed from {checkpoint_path} at epoch {state['epoch']} step {state['step']}", file=sys.stderr)

    train = tokenize(read_jsonl(Path(args.data) / "train.jsonl"), tok, args.max_length, "train")
    dev = tokenize(read_jsonl(Path(args.data) / "dev.jsonl"), tok, args.max_length, "dev")
    train_batches, dev_batches = make_batches(train, args.max_tokens), make_batches(dev, args.max_tokens)
    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, {len(train)} train pairs in {len(train_batches)} "
          f"batches of <= {args.max_tokens} tokens, device {device}{' bf16' if use_bf16 else ''}", file=sys.stderr)

    start, last_save = time.perf_counter() - state["seconds"], time.perf_counter()
    tokens_seen, window_start = 0, time.perf_counter()
    sitting = (state["step"], time.perf_counter())  # where and when this sitting started
    out_of_time = False
    while state["epoch"] < args.epochs and not out_of_time:
        order = list(range(len(train_batches)))
        random.Random(args.seed * 1_000_003 + state["epoch"]).shuffle(order)  # same order when resumed
        for index in order[state["batch_in_epoch"]:]:
            # Checked before a step, so that running a finished command again trains no further.
            if (args.time_budget and state["seconds"] > args.time_budget * 60) or \
                    (args.max_steps and state["step"] >= args.max_steps):
                out_of_time = True
                break
            batch = collate(train, train_batches[index], config.decoder_start_token_id, device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"] + 1, args.lr, args.warmup)
            with autocast:
                loss = loss_fn(model, batch, args.label_smoothing, args.exit_layer, args.exit_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            update_average(average, model, min(args.ema, (1 + state["step"]) / (10 + state["step"])))
            state["step"] += 1
            state["batch_in_epoch"] += 1
            tokens_seen += int((batch["labels"] != -100).sum())
            state["seconds"] = time.perf_counter() - start
            if state["step"] % args.log_every == 0:
                rate = tokens_seen / (time.perf_counter() - window_start)
                done = (state["epoch"] + state["batch_in_epoch"] / len(order)) / args.epochs
                eta = state["seconds"] * (1 - done) / max(done, 1e-9)
                if args.time_budget:
                    eta = min(eta, args.time_budget * 60 - state["seconds"])
                if args.max_steps:  # at this sitting's pace so far
                    pace = (time.perf_counter() - sitting[1]) / (state["step"] - sitting[0])
                    eta = min(eta, (args.max_steps - state["step"]) * pace)
                print(f"epoch {state['epoch'] + 1}/{args.epochs} step {state['step']} loss {loss.item():.3f} "
                      f"lr {group['lr']:.2e} {rate:,.0f} target tok/s elapsed {state['seconds'] / 60:.1f} min "
                      f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
                tokens_seen, window_start = 0, time.perf_counter()
            if time.perf_counter() - last_save > args.checkpoint_minutes * 60:
                save_checkpoint(checkpoint_path, model, average, optimizer, state)
                last_save = time.perf_counter()
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            loss = dev_loss(average, dev, dev_batches, config.decoder_start_token_id, device, autocast)
            print(f"epoch {state['epoch']} done: dev loss {loss:.3f} (perplexity {math.exp(loss):.1f})",
                  file=sys.stderr, flush=True)
    save_checkpoint(checkpoint_path, model, average, optimizer, state)
    save_hf(average, out / "hf", tokenizer=args.tokenizer, dtype=getattr(torch, args.export_dtype))
    print(f"stopped at epoch {state['epoch']} step {state['step']} after {state['seconds'] / 60:.1f} min; "
          f"wrote {out / 'hf'}", file=sys.stderr)
    if args.bleu:
        rows = read_jsonl(Path(args.data) / "dev.jsonl")[:args.bleu_limit or None]
        print(f"dev greedy BLEU {dev_bleu(average, tok, rows, device):.2f}",
              file=sys.stderr)


def dev_bleu(model, tok: Tokenizer, rows, device, batch_size: int = 64) -> float:
    """Corpus BLEU (sacrebleu) of batched greedy translations."""
    import sacrebleu

    outputs = translate(model, [tok.encode(r["source"]) for r in rows], device, batch_size)
    return sacrebleu.corpus_bleu([tok.decode(ids) for ids in outputs], [[r["reference"] for r in rows]]).score


@torch.no_grad()
def translate(model, sources: list[list[int]], device, batch_size: int = 64, max_new_tokens: int = 256,
              show_progress: bool = False, length_cap=None) -> list[list[int]]:
    """Greedy outputs for source ids, in their order; batches group sources of similar length (little padding).
    length_cap(n), if given, also bounds a batch's outputs by its longest source length n, so that one
    runaway output (a repetition loop) does not keep the whole batch decoding up to max_new_tokens."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs = [None] * len(sources)
    starts = range(0, len(order), batch_size)
    for start in progress(starts, len(starts), "translating", show_progress):
        chunk = order[start:start + batch_size]
        input_ids = pad([sources[i] for i in chunk], PAD_ID, device)
        limit = max_new_tokens if length_cap is None else min(max_new_tokens, length_cap(input_ids.shape[1]))
        for i, ids in zip(chunk, minibild.greedy(model, input_ids, limit, (input_ids != PAD_ID).long())):
            outputs[i] = ids
    return outputs


@torch.no_grad()
def grow_from(model, source):
    """Start `model` from a smaller trained `source` of the same d_model (function-preserving growth).
    Every tensor takes the source's values in its overlapping corner. Added heads, feed-forward units
    and whole layers contribute nothing until trained, because their output projections start at zero."""
    if source.config.d_model != model.config.d_model or source.config.vocab_size != model.config.vocab_size:
        sys.exit(f"--init-from: d_model/vocab {source.config.d_model}/{source.config.vocab_size} must equal "
                 f"the preset's {model.config.d_model}/{model.config.vocab_size}")
    old = source.state_dict()
    for name, p in model.state_dict().items():
        if name.endswith((".o.weight", ".wo.weight")):
            p.zero_()  # columns (heads, units) the source lacks, and whole new layers, add nothing
        if name in old:
            p[tuple(slice(0, n) for n in old[name].shape)] = old[name]


def init_weights(model, config):
    """Mesh-TensorFlow T5 initialisation: each matrix scaled by its fan-in (queries also by 1/sqrt(d_kv),
    the attention scaling T5 folds into weights instead of applying at run time)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name == "embed.weight":
            torch.nn.init.normal_(p, std=1.0)
        elif name.endswith("relative_bias.weight"):
            torch.nn.init.normal_(p, std=config.d_model ** -0.5)
        elif name.endswith(".q.weight"):
            torch.nn.init.normal_(p, std=(config.d_model * config.d_kv) ** -0.5)
        else:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)  # nn.Linear weight: (out, in)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("tokenizer", help="train the shared sentencepiece model on the training split")
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="runs/spiece.model")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.set_defaults(func=train_tokenizer)
    p = sub.add_parser("model", help="train one T5 model (resumes from OUT/checkpoint.pt)")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--data", default="data")
    p.add_argument("--tokenizer", default="runs/spiece.model")
    p.add_argument("--out", required=True)
    p.add_argument("--init-from", help="start from this trained Hugging Face T5 folder, grown to the preset")
    p.add_argument("--epochs", type=int, default=100, help="stop after this many epochs")
    p.add_argument("--time-budget", type=float, default=0, help="also stop after this many minutes (0: none)")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps in all (0: none)")
    p.add_argument("--bleu", action="store_true", help="at the end, report greedy BLEU on the dev split")
    p.add_argument("--bleu-limit", type=int, default=0, help="with --bleu, only the first N dev pairs (0: all)")
    p.add_argument("--max-tokens", type=int, default=12000, help="padded source+target tokens per batch")
    p.add_argument("--max-length", type=int, default=192, help="drop (and count) longer training pairs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--exit-layer", type=int, default=0,
                   help="also train the first K decoder layers as an early-exit small model (0: no)")
    p.add_argument("--exit-weight", type=float, default=1.0, help="weight of the early-exit loss")
    p.add_argument("--ema", type=float, default=0.999, help="decay of the exported weight average (0: last weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--export-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.set_defaults(func=train_model)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
