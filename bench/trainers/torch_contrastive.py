"""The contrastive trainer's step in PyTorch: sentence-transformers' MultipleNegativesRankingLoss.

Usage: python torch_contrastive.py MODEL_DIR DISTILL.jsonl STEPS BATCH GROUP QUERY_LEN PASSAGE_LEN THREADS

The same job as `rir train --trainer contrastive-trainer` with `loss = "infonce"`
on the same file: BATCH queries a step, each with its positive and GROUP-1
negatives (in-batch negatives too), queries truncated to QUERY_LEN tokens and
passages to PASSAGE_LEN, mean pooling and L2 normalisation (all-MiniLM-L6-v2's
modules), scale 20 (temperature 0.05), AdamW at 2e-5 with weight decay 0.01.
A warm-up step is not timed. Prints one JSON line: seconds, steps, examples/s,
tokens/s (real, unpadded tokens of queries and passages) and GFLOP/s counted as
rir counts them (6 FLOPs per non-embedding parameter per token).
"""

import json
import sys
import time


def main() -> None:
    model_dir, data, steps, batch, group, qlen, plen, threads = sys.argv[1:9]
    steps, batch, group, qlen, plen, threads = map(int, (steps, batch, group, qlen, plen, threads))
    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    torch.set_num_threads(threads)
    torch.manual_seed(13)
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    word = models.Transformer(model_dir)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"), models.Normalize()], device="cpu")
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    tok = model.tokenizer

    def features(texts, max_len):
        f = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return dict(f), int(f["attention_mask"].sum())

    def step(i):
        b = [rows[(i * batch + j) % len(rows)] for j in range(batch)]
        sides = [features([r["query"] for r in b], qlen), features([r["pos"][0] for r in b], plen)]
        sides += [features([r["neg"][n] for r in b], plen) for n in range(group - 1)]
        loss = loss_fn([s[0] for s in sides], torch.zeros(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return sum(s[1] for s in sides), float(loss.detach())

    step(0)
    tokens = 0
    t = time.perf_counter()
    for i in range(1, steps + 1):
        n, loss = step(i)
        tokens += n
    seconds = time.perf_counter() - t
    emb = word.auto_model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - emb
    print(json.dumps({
        "engine": "sentence-transformers MultipleNegativesRankingLoss",
        "torch": torch.__version__,
        "steps": steps,
        "seconds": seconds,
        "examples_per_s": steps * batch / seconds,
        "tokens_per_s": tokens / seconds,
        "gflop_per_s": 6.0 * params * tokens / seconds / 1e9,
        "last_loss": loss,
    }))


if __name__ == "__main__":
    main()
