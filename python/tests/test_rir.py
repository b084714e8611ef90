"""The Python package against the real thing: MiniLM and SmolLM2 from the
package index, `rir serve` as the OpenAI-compatible server, SciFact from the
mirror, the `rir` command for equality, pytrec_eval and ranx as references."""

import json
import random
import subprocess

import numpy as np
import pytest

import rir
from conftest import MINILM, ROOT, SMOLLM


def test_seed_readme_example_through_an_openai_compatible_server(served_smollm, capsys):
    """The seed README's first example, verbatim except the model names, the
    server (rir serve on loopback instead of OpenAI) and `devices` (this
    machine has no GPU)."""
    base, served_name = served_smollm
    api_key = ''
    base_url = base

    from rir import Reinforced_IR_Model

    model = Reinforced_IR_Model(
        model_name_or_path=MINILM,
        query_instruction_for_retrieval="Represent this sentence for searching relevant passages: ",
        use_fp16=True,
        devices=['cpu'],
        generator_model_name_or_path=served_name,
        api_key=api_key,
        base_url=base_url,
        temperature=0,
        model_type='gpt' # gpt, llm, llm_instruct
    )

    queries = ["how much protein should a female eat", "summit define"]

    documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon. Check out the chart below to see how much protein you should be eating each day.",
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more governments."
    ]

    task_instruction = 'Given a web search query, retrieve relevant passages that answer the query.'
    answer_type = 'passage'

    embeddings_1 = model.encode_queries(
        task_instruction=task_instruction,
        answer_type=answer_type,
        queries=queries
    )
    embeddings_2 = model.encode_corpus(corpus=documents)
    similarity = embeddings_1 @ embeddings_2.T
    print(similarity)

    assert similarity.shape == (2, 2) and similarity.dtype == np.float32
    assert "[[" in capsys.readouterr().out
    # Each query's own document ranks first; the generator was asked.
    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 1] > similarity[1, 0], similarity
    assert model.last_augmentations is not None and all(a.strip() for a in model.last_augmentations)


def test_seed_inference_example_with_a_local_generator():
    """The README's inference example (a local instruct model), verbatim
    except the model names and `devices`."""
    from rir import Reinforced_IR_Model

    model = Reinforced_IR_Model(
        model_name_or_path=MINILM,
        query_instruction_for_retrieval="",
        pooling_method='mean',
        normalize_embeddings=False,
        model_class='encoder-only-base',
        use_fp16=True,
        devices=['cpu'],
        generator_model_name_or_path=SMOLLM,
        temperature=0,
        model_type='llm_instruct' # gpt, llm, llm_instruct
    )

    queries = ["how much protein should a female eat", "summit define"]

    documents = [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon. Check out the chart below to see how much protein you should be eating each day.",
        "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or more governments."
    ]

    task_instruction = 'Given a web search query, retrieve relevant passages that answer the query.'
    answer_type = 'passage'

    embeddings_1 = model.encode_queries(
        task_instruction=task_instruction,
        answer_type=answer_type,
        queries=queries
    )
    embeddings_2 = model.encode_corpus(corpus=documents)
    similarity = embeddings_1 @ embeddings_2.T
    print(similarity)

    assert similarity[0, 0] > similarity[0, 1] and similarity[1, 1] > similarity[1, 0], similarity
    # normalize_embeddings=False reached the plugin: document rows are not unit length.
    assert not np.allclose(np.linalg.norm(embeddings_2, axis=1), 1.0, atol=1e-3)


def test_embeddings_equal_what_rir_encode_writes(rir_bin, tmp_path):
    """Same texts, same settings, caches off on both sides: the arrays are
    bit-identical to the CLI's .npy files, augmentations included."""
    queries = ["what causes scurvy", "do statins reduce the risk of stroke", "summit define"]
    docs = ["Scurvy is caused by a lack of vitamin C.", "Statins lower LDL cholesterol.", "A summit is the top of a mountain."]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    out = tmp_path / "cli"
    subprocess.run(
        [rir_bin, "encode", "--queries", str(tmp_path / "q.txt"), "--docs", str(tmp_path / "d.txt"),
         "--retriever-config", f'model = "{MINILM}"', "--generator", "llama-generator",
         "--generator-config", f'model = "{SMOLLM}"', "--augmentation-max-tokens", "32",
         "--task-instruction", "Given a question, retrieve passages that answer it.",
         "--no-cache", "--output", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )
    model = rir.ReinforcedIRModel(
        MINILM, generator_model_name_or_path=SMOLLM, batch_size=64,
        augmentation_max_tokens=32, cache=False,
    )
    q = model.encode_queries("Given a question, retrieve passages that answer it.", "passage", queries)
    d = model.encode_corpus(docs)
    assert q.dtype == np.float32 and q.shape == (3, 384)
    assert np.array_equal(q, np.load(out / "queries.npy"))
    assert np.array_equal(d, np.load(out / "docs.npy"))
    cli_aug = [json.loads(line)["augmentation"] for line in (out / "queries.jsonl").read_text().splitlines()]
    assert model.last_augmentations == cli_aug
    # A single string gives one row, as FlagEmbedding does.
    assert np.array_equal(model.encode_corpus(docs[0]), d[0])


def test_a_bad_config_raises_the_clis_message(rir_bin, tmp_path):
    with pytest.raises(rir.RirError) as e:
        rir.ReinforcedIRModel(MINILM, retriever_config={"poolin": "mean"})
    (tmp_path / "d.txt").write_text("x\n")
    cli = subprocess.run(
        [rir_bin, "encode", "--docs", str(tmp_path / "d.txt"), "--retriever-config", f'model = "{MINILM}"\npoolin = "mean"',
         "--output", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert cli.returncode != 0
    assert "poolin" in str(e.value)
    # The same one-line message the command prints (which names its flag first).
    assert cli.stderr.strip().splitlines()[-1] == f"error: --retriever-config: {e.value}"

    with pytest.raises(rir.RirError, match="no-such-plugin"):
        rir.ReinforcedIRModel(MINILM, retriever="no-such-plugin")
    with pytest.raises(rir.RirError, match="devices"):
        rir.ReinforcedIRModel(MINILM, devices=["cuda:0", "cuda:1"])
    with pytest.raises(rir.RirError, match="nDCG@x|measure"):
        rir.evaluate({"q": {"d": 1.0}}, {"q": {"d": 1}}, "nDCG@x")
    with pytest.raises(rir.RirError, match=r"<string>:3"):
        rir.run('name = "x"\ndatasets = ["scifact"]\nbogus = 1\n', dry_run=True)


def test_evaluate_equals_pytrec_eval_on_scifact(mirror):
    """rir.evaluate over SciFact's qrels (loaded by name from the mirror) and
    a random run equals pytrec_eval (trec_eval's C code) per query."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = rir.load_qrels("scifact", mirror=mirror)
    assert len(qrels) == 300
    docs = sorted({d for q in qrels.values() for d in q})
    rng = random.Random(7)
    run = {q: {d: rng.random() for d in rng.sample(docs, 150) + list(qrels[q])} for q in qrels}
    ev = rir.evaluate(run, qrels, ["nDCG@10", "R@100", "P@10", "AP@100"])
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100", "P_10", "map_cut_100"}).evaluate(run)
    names = {"nDCG@10": "ndcg_cut_10", "R@100": "recall_100", "P@10": "P_10", "AP@100": "map_cut_100"}
    for q, values in ev.per_query.items():
        for m, v in values.items():
            assert abs(v - ref[q][names[m]]) < 1e-9, (q, m, v, ref[q][names[m]])
    measures, per_query = ev
    assert set(measures) == set(names) and len(per_query) == 300
    assert abs(measures["nDCG@10"] - np.mean([ref[q]["ndcg_cut_10"] for q in ref])) < 1e-9


def test_run_returns_the_table_and_files_ranx_reads(mini_scifact, tmp_path):
    ranx = pytest.importorskip("ranx")
    pd = pytest.importorskip("pandas")
    exp = f"""
name = "py"
datasets = [{json.dumps(str(mini_scifact))}]
[retriever]
plugin = "candle-encoder"
config = {{ model = "{MINILM}", max_length = 128 }}
[generator]
plugin = "llama-generator"
config = {{ model = "{SMOLLM}" }}
[eval]
measures = ["nDCG@10", "R@100"]
[[variants]]
name = "base"
[[variants]]
name = "BM25"
retriever = "lexical"
[[variants]]
name = "RRF"
fuse = {{ runs = ["base", "BM25"] }}
"""
    out = rir.run(exp, output=tmp_path / "runs")
    assert "nDCG@10" in str(out) and "RRF" in str(out)
    df = out.dataframe
    assert isinstance(df, pd.DataFrame) and list(df.index) == ["base", "BM25", "RRF"]
    assert out.data["runs"] == ["base", "BM25", "RRF"]
    # The run file as ranx reads it, without renaming, equals rir's numbers.
    run_file = next((out.root / "scifact-mini").glob("**/base.scifact-mini.trec"))
    r = ranx.Run.from_file(str(run_file), kind="trec")
    assert r.to_dict().keys() == rir.load_run(run_file).keys()
    qrels = rir.load_qrels(mini_scifact)
    ours = rir.evaluate(run_file, qrels, ["nDCG@10"]).measures["nDCG@10"]
    theirs = ranx.evaluate(ranx.Qrels(qrels), r, "ndcg@10")
    assert abs(ours - theirs) < 1e-6
    assert abs(df.loc["base", ("scifact-mini", "nDCG@10")] - ours) < 1e-9
    # A second call reuses every step (same content hashes).
    again = rir.run(exp, output=tmp_path / "runs")
    assert str(again) == str(out)


def test_save_run_round_trips(tmp_path):
    run = {"q1": {"d1": 0.5, "d2": 1.5}, "q2": {"d3": -1.0}}
    rir.save_run(run, tmp_path / "r.trec", tag="t")
    assert rir.load_run(tmp_path / "r.trec") == run
    lines = (tmp_path / "r.trec").read_text().splitlines()
    assert lines[0].split() == ["q1", "Q0", "d2", "1", lines[0].split()[4], "t"]


def test_progress_bars_reach_sys_stderr(capsys):
    """Bars go through Python's sys.stderr (what a notebook shows), each
    redraw a \\r-led line; a cleared bar is blanked."""
    model = rir.ReinforcedIRModel(MINILM, cache=False, batch_size=8)
    model.encode_corpus([f"document number {i} about retrieval on a CPU" for i in range(600)])
    err = capsys.readouterr().err
    assert "\r" in err and "texts" in err and "/600" in err, repr(err[-500:])
