#!/usr/bin/env python3
"""Hugging Face `tokenizers` half of the BPE training benchmark.

Trains a byte-level BPE with BpeTrainer on the given files, pre-tokenizing with
the same split regex as kiln (Split(pattern, Isolated) then ByteLevel without its
own regex), and prints {"seconds": .., "vocab_size": ..} as JSON. Compare with
`cargo run --release -p kiln-tokenizer --example train_bench -- --vocab-size N FILES`.

    python bench/train_hf.py --vocab-size 16384 [--min-frequency 2] [--threads N] FILES...

`--threads` sets RAYON_NUM_THREADS for the tokenizers library (it must be set
before the library starts its pool, which this script does).
"""
import argparse
import json
import os
import sys
import time

CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--min-frequency", type=int, default=2, help="kiln's default is 2")
    ap.add_argument("--pattern", default=CL100K_PATTERN)
    ap.add_argument("--special", action="append", default=[])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--save", help="write the trained tokenizer.json here")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(args.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # BpeTrainer's vocab_size counts the 256-byte alphabet and the specials, like kiln's.
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=args.special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    tok.train(args.files, trainer)
    seconds = time.perf_counter() - start
    if args.save:
        tok.save(args.save)
    print(json.dumps({"seconds": seconds, "vocab_size": tok.get_vocab_size()}))


if __name__ == "__main__":
    sys.exit(main())
