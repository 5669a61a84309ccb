"""Peer side of `kiln tokenizer bench`: tiktoken and Hugging Face tokenizers on the same inputs.

kiln runs this script with the Python of a venv it made for itself. It times only the encode or
train call (loading is excluded, as on kiln's side) and prints one JSON object on stdout.
HF tokenizers takes its thread count from RAYON_NUM_THREADS, which kiln sets per run.
"""
import json
import sys
import time


def best_of(reps, fn):
    best, out = None, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def encode(args):
    import tiktoken
    import tiktoken.load
    from tokenizers import Tokenizer

    # newline="" keeps \r and \r\n as they are; the default would rewrite them to \n.
    text = open(args["corpus"], encoding="utf-8", newline="").read()
    # Documents keep their separators, exactly like Rust's split_inclusive("\n\n") on kiln's side.
    parts = text.split("\n\n")
    docs = [d + "\n\n" for d in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    threads, reps = args["threads"], args["reps"]
    ranks = tiktoken.load.load_tiktoken_bpe(args["ranks"])
    enc = tiktoken.Encoding(args["encoding"], pat_str=args["pattern"], mergeable_ranks=ranks,
                            special_tokens={})
    hf = Tokenizer.from_file(args["hf_json"])
    res = {}
    if threads == 1:
        s, ids = best_of(reps, lambda: enc.encode_ordinary(text))
        res["tiktoken"] = {"seconds": s, "tokens": len(ids)}
        # HF tokenizers is slow on one multi-megabyte string (offset bookkeeping); its
        # ordinary use is a batch of documents, here on a single thread.
        s, out = best_of(reps, lambda: hf.encode_batch(docs, add_special_tokens=False))
        res["hf"] = {"seconds": s, "tokens": sum(len(e.ids) for e in out)}
    else:
        s, out = best_of(reps, lambda: enc.encode_ordinary_batch(docs, num_threads=threads))
        res["tiktoken"] = {"seconds": s, "tokens": sum(map(len, out))}
        s, out = best_of(reps, lambda: hf.encode_batch(docs, add_special_tokens=False))
        res["hf"] = {"seconds": s, "tokens": sum(len(e.ids) for e in out)}
    return res


def train(args):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(args["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args["vocab_size"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    t0 = time.perf_counter()
    tok.train(args["files"], trainer)
    return {"hf": {"seconds": time.perf_counter() - t0, "vocab_size": tok.get_vocab_size()}}


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps({"encode": encode, "train": train}[args["mode"]](args)))
