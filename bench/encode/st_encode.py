"""sentence-transformers on PyTorch CPU, the row `rir bench encode --sentence-transformers` compares with.

Usage: python st_encode.py MODEL_DIR TEXTS.jsonl THREADS BATCH MAX_LENGTH OUT.f32 [DTYPE]

DTYPE is f32 (default); bf16: the model's weights cast to torch.bfloat16
(`model.to(torch.bfloat16)`: every op in bf16, PyTorch's CPU bf16 kernels,
oneDNN on CPUs with AVX512-BF16); or bf16-autocast: the f32 model under
`torch.autocast("cpu", dtype=torch.bfloat16)`, PyTorch's mixed precision
(linear layers and attention products in bf16, the ops autocast keeps in f32
in f32). The embeddings are returned as float32.

MODEL_DIR is the same Hugging Face directory candle-encoder loads (resolved by
rir from the same package). The pipeline is built explicitly (transformer,
mean pooling, L2 normalisation: all-MiniLM-L6-v2's modules.json) so it does not
depend on which sentence-transformers files the package ships. Texts are
encoded once after a warm-up on the first 8, as rir's rows are; embeddings
go to OUT.f32 (row-major float32) for the cosine check, and one JSON line with
the timing to stdout.
"""

import json
import sys
import time


def main() -> None:
    model_dir, texts_path, threads, batch, max_length, out = sys.argv[1:7]
    dtype = sys.argv[7] if len(sys.argv) > 7 else "f32"
    if dtype not in ("f32", "bf16", "bf16-autocast"):
        sys.exit(f"st_encode.py: dtype {dtype!r} is not f32, bf16 or bf16-autocast")
    import contextlib

    import torch
    from sentence_transformers import SentenceTransformer, __version__ as st_version, models

    torch.set_num_threads(int(threads))
    texts = [json.loads(line)["text"] for line in open(texts_path, encoding="utf-8")]
    word = models.Transformer(model_dir, max_seq_length=int(max_length))
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    model.eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    kw = dict(batch_size=int(batch), convert_to_tensor=True, show_progress_bar=False)
    mixed = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16-autocast" else contextlib.nullcontext()
    with torch.inference_mode(), mixed:
        model.encode(texts[:8], **kw)
        t = time.perf_counter()
        emb = model.encode(texts, **kw)
        seconds = time.perf_counter() - t
    emb = emb.float().cpu().numpy()
    emb.astype("float32").tofile(out)
    print(json.dumps({
        "seconds": seconds,
        "docs": len(texts),
        "dim": int(emb.shape[1]),
        "torch": torch.__version__,
        "sentence_transformers": st_version,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
    }))


if __name__ == "__main__":
    main()
