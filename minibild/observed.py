"""Watching a model's calls without touching it: `observed(model, around)` is a model that runs each of its encode
and decode calls through around(call, method, *args), and passes everything else through.

This is how the conformance suite records logits, the tests record and check every call, and the benchmarks time
them: minibild never sets, replaces or deletes an attribute of a caller's model or of its classes. call says which
call it is: "encode", "decode", or "decode_rows" (batched BiLD's ragged.decode(model, cache, rows, tokens)); method
is the model's own; around must return method(*args)'s result (it may change it, as a test planting a bug does).

Give the observed models to bild.generate, bild_sample, batch.generate_batch or minibild.greedy in place of the
models. With an early-exit small model, observe the EarlyExit and pass the large model itself: the large model then
decodes as the early-exit model's shared_large (early_exit.py), which the observed EarlyExit observes too.
"""
from . import ragged
from .early_exit import EarlyExit


class Observed:
    """A model (T5, or an EarlyExit's shared_large) whose encode and decode calls go through around."""

    def __init__(self, model, around):
        self.model, self.around = model, around

    def __getattr__(self, name):  # config, embed, training, new_cache, decoder, ...
        return getattr(self.model, name)

    def encode(self, *args, **kwargs):
        return self.around("encode", self.model.encode, *args, **kwargs)

    def decode(self, decoder_input_ids, cache):
        return self.around("decode", self.model.decode, decoder_input_ids, cache)

    def decode_rows(self, cache, rows, tokens):
        """ragged.decode on this model: batched BiLD's calls (batch.py)."""
        def decode_rows(cache, rows, tokens):
            return ragged.decode(self.model, cache, rows, tokens)
        return self.around("decode_rows", decode_rows, cache, rows, tokens)


class ObservedEarlyExit(EarlyExit):
    """An EarlyExit on the same large model and exit layer, whose encode and decode calls and whose shared_large's
    go through around. The large model it runs is the one given, untouched."""

    def __init__(self, early_exit: EarlyExit, around):
        super().__init__(early_exit.large, early_exit.exit_layer)
        # The given model's calls run inside around, so observing an observed model observes both ways.
        self.early_exit, self.around = early_exit, around
        self.shared_large = Observed(early_exit.shared_large, around)

    def encode(self, *args, **kwargs):
        return self.around("encode", self.early_exit.encode, *args, **kwargs)

    def decode(self, decoder_input_ids, view):
        return self.around("decode", self.early_exit.decode, decoder_input_ids, view)


def observed(model, around):
    """model, its encode and decode calls (its early-exit large model's too) run through around(call, method, *args)."""
    if isinstance(model, EarlyExit):
        return ObservedEarlyExit(model, around)
    return Observed(model, around)
