"""Peer side of `kiln bench embed`: sentence-transformers encoding the same texts on the CPU.

kiln runs this script in a child process per thread count, with OMP_NUM_THREADS and
MKL_NUM_THREADS set, passing one JSON argument, and reads one JSON object from stdout. The model
is loaded from the same folder kiln loads (the `minilm` asset), offline. Each timed round is one
`model.encode(texts, batch_size=...)` call over all texts: tokenization, batching (sorted by
length, padded per batch), the encoder, mean pooling and normalization, as a user would call it.
Loading and the warm-up rounds are excluded.
"""
import json
import os
import resource
import sys
import time


def main():
    args = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args["threads"])
    with open(args["texts_file"], encoding="utf-8") as f:
        texts = json.load(f)
    model = SentenceTransformer(args["model"], device="cpu")
    model.eval()
    round_s = []
    vectors = None
    with torch.inference_mode():
        for i in range(args["warmup"] + args["rounds"]):
            t0 = time.perf_counter()
            out = model.encode(
                texts,
                batch_size=args["batch"],
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            dt = time.perf_counter() - t0
            if i >= args["warmup"]:
                round_s.append(dt)
            vectors = out
    print(
        json.dumps(
            {
                "round_s": round_s,
                "check": [v.tolist() for v in vectors[: args["check"]]],
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "versions": f"sentence-transformers {sentence_transformers.__version__}, "
                f"torch {torch.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main()
