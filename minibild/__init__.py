"""minibild: a reference implementation of Big Little Decoder (BiLD) speculative decoding for T5."""
from .config import T5Config
from . import bild
from .generate import greedy
from .sampling import bild_sample, sample
from .batch import generate_batch
from .early_exit import EarlyExit
from .model import T5, KVCache
from .tokenizer import Tokenizer
from .weights import load, save

__all__ = ["T5Config", "T5", "EarlyExit", "KVCache", "Tokenizer", "greedy", "sample", "bild_sample",
           "generate_batch", "load", "save"]
