"""rir's DPO step in PyTorch, written as TRL's DPOTrainer computes it (sigmoid loss).

Usage: python torch_dpo.py MODEL_DIR PAIRS.jsonl THREADS [GRAD_ACCUM] [MAX_LENGTH]

MODEL_DIR is an HF Llama directory (the `merged/` directory rir's dpo-trainer
writes: the same weights in f32). As the quickstart's RLRF job: LoRA r 32 /
alpha 64 on every linear map (PEFT), beta 0.1, AdamW at 5e-5, GRAD_ACCUM pairs
per optimiser step (4), MAX_LENGTH tokens (256) with the prompt's end kept.
Each pair is TRL's "concatenated forward": chosen and rejected as two
right-padded rows of one batch; reference log-probabilities are computed
once, adapters off, before the timed loop (rir does the same). One epoch
over the pairs. Prints one JSON line: train seconds, optimiser steps and
tokens/s counted as rir counts them (the prompt twice, both responses).
"""

import json
import sys
import time


def main() -> None:
    model_dir, data, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    grad_accum = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    max_length = int(sys.argv[5]) if len(sys.argv) > 5 else 256
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=targets))

    def chatml(turns):
        # SmolLM2's template (ChatML), as rir renders it from the GGUF.
        text = "".join(f"<|im_start|>{ {'system': 'system', 'human': 'user'}[t['from']] }\n{t['value']}<|im_end|>\n" for t in turns)
        return text + "<|im_start|>assistant\n"

    pairs = []
    for line in open(data, encoding="utf-8"):
        r = json.loads(line)
        p = tok(chatml(r["conversations"]), add_special_tokens=False)["input_ids"]
        c = tok(r["chosen"]["value"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        j = tok(r["rejected"]["value"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        keep = max_length - max(len(c), len(j))
        pairs.append((p[-keep:], c, j))

    def rows(pair):
        p, c, j = pair
        seqs = [p + c, p + j]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id or 0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = torch.full_like(ids, -100)
        for i, s in enumerate(seqs):
            labels[i, len(p):len(s)] = ids[i, len(p):len(s)]
        return ids, mask, labels

    def logps(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        lab = labels[:, 1:]
        lp = torch.gather(logits.log_softmax(-1), 2, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * (lab != -100)).sum(-1)

    batches = [rows(p) for p in pairs]
    with torch.no_grad(), model.disable_adapter():
        refs = [logps(*b) for b in batches]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    tokens, steps = 0, 0
    t = time.perf_counter()
    for i, (b, ref) in enumerate(zip(batches, refs)):
        pol = logps(*b)
        logits = 0.1 * ((pol[0] - ref[0]) - (pol[1] - ref[1]))
        (-F.logsigmoid(logits) / grad_accum).backward()
        p, c, j = pairs[i]
        tokens += 2 * len(p) + len(c) + len(j)
        if (i + 1) % grad_accum == 0 or i + 1 == len(batches):
            opt.step()
            opt.zero_grad()
            steps += 1
    seconds = time.perf_counter() - t
    print(json.dumps({"engine": "PyTorch + PEFT, TRL-style DPO step", "torch": torch.__version__, "pairs": len(pairs), "optimizer_steps": steps,
                      "train_seconds": seconds, "tokens_per_s": tokens / seconds}))


if __name__ == "__main__":
    main()
